"""`sdft eval`: held-out perplexity (sliding window) and narrow-task accuracy of one model."""
from __future__ import annotations

from .common import friendly

from .common import add_device_arg, add_dtype_arg, add_model_arg, add_text_args


def configure(p):
    add_model_arg(p)
    add_text_args(p)
    p.add_argument("--tokens", type=int, default=16384, help="tokens of the text to score")
    p.add_argument("--window", type=int, default=None,
                   help="tokens per scored window (default 256, or the model's context if shorter)")
    p.add_argument("--stride", type=int, default=None, help="window step (default half the window)")
    p.add_argument("--task-examples", type=int, default=48, help="narrow-task examples (0: skip)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the result JSON here")
    add_device_arg(p)
    add_dtype_arg(p)


@friendly
def main(args) -> int:
    from ..data import encode
    from .common import emit, fit_len, load_any, read_text, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    for name in ("tokens", "window", "stride"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if args.stride is not None and args.window is not None and args.stride > args.window:
        raise ValueError(f"--stride ({args.stride}) must not exceed --window ({args.window})")
    text = read_text(args.text, "heldout")
    model, tok, record = load_any(args.model, device, resolve_dtype(args.dtype))
    window = fit_len(args.window, "--window", model)
    stride = args.stride or max(1, window // 2)
    if stride > window:
        raise ValueError(f"--stride ({stride}) must not exceed --window ({window}, the model's context)")
    ids = encode(tok, text)[: args.tokens]
    if ids.numel() < 2:
        raise ValueError("--text: fewer than 2 tokens to score")
    from ..evaluate import perplexity
    acc = None
    if args.task_examples > 0:  # first: it refuses a model too short for the task before any scoring
        from .. import tasks
        acc = float(tasks.task_accuracy(model, tok, tasks.make_examples(args.task_examples, seed=1)))
    out = {"model": args.model or "default", "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
           "tokens": int(ids.numel()),
           "perplexity": float(perplexity(model, ids, window=window, stride=stride))}
    if acc is not None:
        out["task_accuracy"] = acc
    if record:
        out["degradation"] = {"kind": record["kind"], "params": record["params"]}
    emit(out, args.out)
    return 0
