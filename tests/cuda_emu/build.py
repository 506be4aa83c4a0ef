"""Builds the CUDA kernels of csrc/cuda as an emulated CPU library (see emu.h) and loads it.

The sources are compiled as they are, after three rewrites C++ needs, made on copies under the build
directory (the rewritten files are kept there to read):
- `kernel<...><<<grid, block, smem, stream>>>(args)` -> `::emu::launch("kernel<...>", kernel<...>, grid,
  block, smem, stream)(args)`;
- `__shared__ T name[N];` -> a reference to the block's own copy of the variable; `extern __shared__ T
  name[];` -> a pointer to the block's dynamic shared memory;
- `__CUDA_ARCH__` -> `EMU_CUDA_ARCH` (900: the sm_90 paths are compiled), and the ops are registered as
  CPU kernels of `torch.ops.sdft_emu` (schemas from csrc/ops.cpp) instead of CUDA kernels of
  `torch.ops.sdft_kernels`, so both can be called side by side on the same CPU tensors.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# SDFT_EMU_CSRC / SDFT_EMU_BUILD: another source tree and build directory (mutate.py's planted bugs)
CSRC = Path(os.environ.get("SDFT_EMU_CSRC", ROOT / "csrc"))

_LAUNCH = re.compile(r"^(\s*)(\S.*?)<<<(.*?)>>>\(", re.M)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:<> ]+?)\s+(\w+)\[\];")
_SHARED = re.compile(r"__shared__\s+(?:__align__\(\d+\)\s+)?([\w:<> ]+?)\s+(\w+)((?:\[[^\];]+\])+);")


def rewrite(src: str) -> str:
    """The three rewrites of a csrc/cuda source (module docstring)."""
    out = _LAUNCH.sub(lambda m: f'{m[1]}::emu::launch("{m[2]}", {m[2]}, {m[3]})(', src)
    out = _EXTERN_SHARED.sub(lambda m: f"{m[1]}* {m[2]} = ::emu::dynamic_shared_as<{m[1]}>();", out)
    out = _SHARED.sub(lambda m: (f"static char emu_key_{m[2]}; {m[1]} (&{m[2]}){m[3]} = "
                                 f"::emu::shared<{m[1]}{m[3]}>(&emu_key_{m[2]}, __FILE__, __LINE__);"), out)
    out = out.replace("__CUDA_ARCH__", "EMU_CUDA_ARCH")
    return out.replace("TORCH_LIBRARY_IMPL(sdft_kernels, CUDA, m)", "TORCH_LIBRARY_IMPL(sdft_emu, CPU, m)")


def _schemas() -> str:
    src = (CSRC / "ops.cpp").read_text()
    body = src[src.index("TORCH_LIBRARY(sdft_kernels, m)"):]
    return "#include <torch/library.h>\n\n" + body.replace("TORCH_LIBRARY(sdft_kernels, m)",
                                                            "TORCH_LIBRARY(sdft_emu, m)")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:  # unchanged files keep their time: no rebuild
        path.write_text(text)


def load(build_dir: str | os.PathLike | None = None, verbose: bool = False) -> None:
    """Compiles (once; torch's extension cache rebuilds on change) and loads the emulated kernels:
    torch.ops.sdft_emu.<op> (the CUDA kernels, on CPU tensors) and torch.ops.sdft_emu_ctl."""
    from torch.utils.cpp_extension import load as load_ext

    build = Path(build_dir or os.environ.get("SDFT_EMU_BUILD", ROOT / "build" / "cuda_emu"))
    src_dir = build / "src"
    sources = [str(HERE / "emu.cpp")]
    for f in sorted((CSRC / "cuda").iterdir()):
        if f.suffix not in (".cu", ".cuh"):
            continue
        dst = src_dir / "cuda" / (f.stem + ".cpp" if f.suffix == ".cu" else f.name)
        _write(dst, rewrite(f.read_text()))
        if f.suffix == ".cu":
            sources.append(str(dst))
    _write(src_dir / "selftest.cpp", rewrite((HERE / "selftest.cu").read_text()))
    sources.append(str(src_dir / "selftest.cpp"))
    _write(src_dir / "ops_schemas.cpp", _schemas())
    sources.append(str(src_dir / "ops_schemas.cpp"))
    (build / "obj").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "2")
    load_ext(
        name="sdft_cuda_emu",
        sources=sources,
        # the shims (c10/cuda, cooperative_groups) must shadow torch's own c10/cuda headers
        extra_include_paths=[str(HERE / "include"), str(src_dir), str(CSRC)],
        extra_cflags=["-O1", "-include", str(HERE / "emu.h"), "-fvisibility=hidden", "-Wno-unused-variable"],
        build_directory=str(build / "obj"),
        is_python_module=False,
        with_cuda=False,
        verbose=verbose,
    )


def configure(order: int = 0, sm_major: int = 9, ptx_version: int = 90, max_active_clusters: int = 1) -> None:
    torch.ops.sdft_emu_ctl.configure(order, sm_major, ptx_version, max_active_clusters)


@contextlib.contextmanager
def guarded(at: str = "end"):
    """CPU tensors allocated inside end (at="end") or start (at="start") where a PROT_NONE page begins
    or ends (emu.cpp): a kernel accessing past the end, or before the start, of one is reported as the
    launch's failure."""
    torch.ops.sdft_emu_ctl.guard({"end": 1, "start": 2}[at])
    try:
        yield
    finally:
        torch.ops.sdft_emu_ctl.guard(0)


def launches() -> list[str]:
    return [line for line in torch.ops.sdft_emu_ctl.launches().splitlines() if line]
