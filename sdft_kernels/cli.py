"""`sdft`: one command, one subcommand per job. Each subcommand lives in its own module exposing
`configure(parser)` and `main(args) -> int`; modules are imported only when their command runs."""
import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "info": ("sdft_kernels.info", "show the build: CPU/CUDA kernels, arch list, torch version, threads"),
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
    return importlib.import_module(args._module).main(args) or 0


if __name__ == "__main__":
    sys.exit(main())
