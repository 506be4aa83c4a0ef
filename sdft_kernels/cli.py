"""`sdft`: one command, one subcommand per job. Each subcommand lives in its own module exposing
`configure(parser)` and `main(args) -> int`; modules are imported only when their command runs."""
import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "info": ("sdft_kernels.info", "show the build: CPU/CUDA kernels, arch list, torch version, threads"),
    # study commands (owner: study engineer)
    "run": ("sdft_kernels.commands.run", "the whole study on a model: degrade, align, recover (SDFT), align, evaluate, report"),
    "degrade": ("sdft_kernels.commands.degrade", "degrade a model (forget / quantize / prune) and save it with its record"),
    "recover": ("sdft_kernels.commands.recover_cmd", "recover a degraded model by SDFT toward its original (resumable)"),
    "align": ("sdft_kernels.commands.align_cmd", "layer-by-layer CKA between a student and its teacher"),
    "eval": ("sdft_kernels.commands.evaluate_cmd", "held-out perplexity and narrow-task accuracy of a model"),
    # benchmarks (owner: bench engineer)
    "bench": ("sdft_kernels.bench", "benchmark our kernels beside every installed peer: time, memory, floor"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="sdft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).configure(p)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args._module).main(args) or 0
    finally:
        if "torch.distributed" in sys.modules:  # under torchrun: leave the group before exit, once the
            from .distributed import leave_process_group  # command's models are gone (see there)
            leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
