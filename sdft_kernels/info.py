"""`sdft info`: what this build of the extension contains."""
import os

import torch

import sdft_kernels


def _backends(op_name):
    """Backends that have a kernel registered for torch.ops.sdft_kernels.<op_name>."""
    qualname = f"sdft_kernels::{op_name}"
    return [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, k)]


def build_info():
    ops = sorted(
        s.name.split("::", 1)[1]
        for s in torch._C._jit_get_all_schemas()
        if s.name.startswith("sdft_kernels::")
    )
    return {
        "sdft_kernels": sdft_kernels.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0") if any(
            "CUDA" in _backends(o) for o in ops) else None,
        "threads": torch.get_num_threads(),
        "cpu_isa": sdft_kernels._C.cpu_isa(),  # what the CPU kernels' row loops run with (SDFT_CPU_ISA caps it)
        "extension": sdft_kernels._C.__file__,
        "ops": {o: _backends(o) for o in ops},
    }


def configure(parser):
    parser.add_argument("--json", action="store_true", help="print the build as JSON")


def main(args):
    info = build_info()
    if args.json:
        import json

        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key != "ops":
            print(f"{key:>16}: {value}")
    print(f"{'ops':>16}:")
    for op, backends in info["ops"].items():
        print(f"{'':>18}{op:<32} {', '.join(backends) or 'no kernel'}")
    return 0
