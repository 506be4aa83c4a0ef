"""`sdft run`: the whole study (degrade -> align -> recover -> align -> evaluate -> correlate)."""
from __future__ import annotations

from .common import add_device_arg, friendly


def configure(p):
    p.add_argument("--out", default="runs/study", metavar="DIR", help="run directory (resumed if it exists)")
    p.add_argument("--model", default=None, metavar="PATH", help="model directory; default: the embedded model")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds)")
    p.add_argument("--specs", nargs="+", default=None, metavar="SPEC",
                   help="degradations to run (default: forget:40 forget:160 rtn:3 rtn:2 gptq:2 blocks:1 "
                        "blocks:2 wanda2:4); see `sdft degrade --help`")
    p.add_argument("--steps", type=int, default=None, help="SDFT steps per run (default 120; --quick: 3)")
    p.add_argument("--no-progress", action="store_true")
    add_device_arg(p)


@friendly
def main(args) -> int:
    import dataclasses
    from ..specs import parse_spec
    from ..study import StudyConfig, run_study

    from pathlib import Path
    from .common import resolve_device
    device = resolve_device(args.device)
    if args.specs:
        for s in args.specs:  # syntax/range errors before loading anything
            parse_spec(s)
    if args.model is not None and not Path(args.model).exists():  # before --out is created
        raise FileNotFoundError(f"--model: {args.model} does not exist (a model directory is expected)")
    cfg = StudyConfig.quick_config(args.model) if args.quick else StudyConfig(model=args.model)
    ctx = _context(args.model)
    if ctx is not None:  # a model with a shorter context gets windows that fit it
        cfg.block_len = min(cfg.block_len, ctx)
        cfg.align_block_len = None if cfg.align_block_len is None else min(cfg.align_block_len, ctx)
    if args.specs:
        cfg.specs = tuple(args.specs)
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps: expected >= 1, got {args.steps}")
        cfg.recover = dataclasses.replace(cfg.recover, steps=args.steps)
    run_study(cfg, args.out, progress=not args.no_progress, device=device)
    return 0


def _context(path):
    """The model directory's max_position_embeddings (from its config alone), or None."""
    if path is None:
        return None
    from transformers import AutoConfig
    from ..models import context_length
    try:
        return context_length(AutoConfig.from_pretrained(str(path), local_files_only=True))
    except (OSError, ValueError):
        return None  # not a model directory: loading it says so, naming --model
