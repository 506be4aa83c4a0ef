"""`sdft degrade`: degrade a model and save it (save_pretrained + exact compressed state + record)."""
from __future__ import annotations

from .common import friendly

from .common import add_device_arg, add_model_arg


def configure(p):
    add_model_arg(p)
    p.add_argument("--spec", required=True,
                   help="forget:STEPS | rtn:BITS[:gSIZE][:asym] | gptq:BITS[:gSIZE][:asym] | blocks:N | "
                        "magnitude:S | wanda:S | magnitude2:4 | wanda2:4")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the degraded model")
    p.add_argument("--calib-blocks", type=int, default=16, help="calibration blocks (GPTQ, Wanda, blocks)")
    p.add_argument("--block-len", type=int, default=None,
                   help="calibration block length (default 256, or the model's context if shorter)")
    p.add_argument("--seed", type=int, default=0)
    add_device_arg(p)


@friendly
def main(args) -> int:
    from ..align import _layers
    from ..data import load_text
    from ..io import check_model_out, save_model_dir
    from ..specs import apply_spec, parse_spec, stack_record
    from .common import blocks, emit, fit_len, load_any, resolve_device

    device = resolve_device(args.device)
    if args.calib_blocks < 1 or (args.block_len is not None and args.block_len < 2):
        raise ValueError("--calib-blocks must be >= 1 and --block-len >= 2")
    spec = parse_spec(args.spec)  # syntax and range, before loading anything
    check_model_out(args.out)
    model, tok, prev = load_any(args.model, device)
    spec = parse_spec(args.spec, len(_layers(model)))
    stack_record(prev, spec)  # what cannot stack on an already degraded model is refused here
    block_len = fit_len(args.block_len, "--block-len", model)
    calib = blocks(tok, load_text("calibration"), block_len, args.calib_blocks, "calibration") \
        if spec.needs_calibration else None
    new, record = apply_spec(spec, model, tok, calib, seed=args.seed)
    record = stack_record(prev, spec, record)
    save_model_dir(new, tok, args.out, record)
    short = {k: v for k, v in record.items() if k in ("kind", "params", "layer_map", "bits_per_weight",
                                                       "removed", "sparsity", "distances")}
    emit({"saved": str(args.out), "record": short})
    return 0
