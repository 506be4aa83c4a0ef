"""Build the single extension `sdft_kernels._C`.

CPU kernels (csrc/ops.cpp + csrc/cpu/*.cpp) are always built. CUDA kernels (csrc/cuda/*.cu) are added
when the installed torch was built with CUDA and a CUDA toolkit is found; no visible GPU is needed.
Environment:
  SDFT_FORCE_CPU=1        build the CPU kernels only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST    CUDA archs to build (default "8.0;9.0")
  MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import setup
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_home():
    """The CUDA toolkit's root. torch takes the directory above `which nvcc`, which is wrong where nvcc is
    a wrapper script outside the toolkit (/usr/local/bin/nvcc: no libcudart there, the link fails);
    nvcc itself knows (`--dryrun` prints TOP=<toolkit>/bin/..). An explicit CUDA_HOME / CUDA_PATH wins."""
    home = cpp_extension.CUDA_HOME
    has_cudart = lambda h: bool(h and glob.glob(os.path.join(h, "lib*", "libcudart.so*")))  # noqa: E731
    if has_cudart(home) or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or not shutil.which("nvcc"):
        return home
    dry = subprocess.run(["nvcc", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    top = re.search(r"^#\$ TOP=(.+)$", dry, re.M)
    found = os.path.realpath(top.group(1).strip()) if top else None
    return found if has_cudart(found) else home


def _want_cuda():
    if os.environ.get("SDFT_FORCE_CPU", "0") not in ("", "0"):
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    sources = ["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        cpp_extension.CUDA_HOME = _cuda_home()  # read by the build steps at call time
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "sdft_kernels._C", sources + _sources("csrc/cuda/*.cu"), include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "sdft_kernels._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
