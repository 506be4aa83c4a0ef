"""Shared argument handling for the study commands: model paths, text files, early input checks."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def add_model_arg(p, name="--model", help_text="model directory (Hugging Face causal LM); default: the embedded model"):
    p.add_argument(name, default=None, metavar="PATH", help=help_text)


def add_text_args(p, default_split="heldout"):
    p.add_argument("--text", default=None, metavar="FILE",
                   help=f"UTF-8 text file to use instead of the shipped '{default_split}' text")


def add_device_arg(p):
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="where the models run: auto (cuda when a GPU is visible, else cpu), cpu, cuda or "
                        "cuda:N; under torchrun every rank uses its own device instead")


def add_dtype_arg(p):
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="precision the models are loaded and run in (bfloat16 halves their memory; the CKA "
                        "statistics are accumulated in float64 either way)")


def resolve_dtype(arg: str | None):
    import torch
    return getattr(torch, arg or "float32")


def resolve_device(arg: str | None):
    """The torch.device for --device, checked before any model is loaded."""
    import torch
    if arg in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(arg)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {arg!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {arg} asked for, but this torch ({torch.__version__}) sees no CUDA "
                             "device; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device: {arg} asked for, but only {torch.cuda.device_count()} CUDA "
                             "device(s) are visible")
    return dev


def read_text(path_or_none, split: str) -> str:
    """The text of --text FILE (checked: exists, non-empty) or the shipped split."""
    if path_or_none is None:
        from ..data import load_text
        return load_text(split)
    p = Path(path_or_none)
    if not p.is_file():
        raise ValueError(f"--text: {p} is not a file")
    text = p.read_text(encoding="utf-8", errors="strict")
    if not text.strip():
        raise ValueError(f"--text: {p} is empty; expected some text to tokenize")
    return text


def blocks(tok, text: str, block_len: int, max_blocks: int | None, what: str):
    from ..data import encode, token_blocks
    n = encode(tok, text).numel()
    if n < block_len:
        raise ValueError(f"{what}: the text has {n} tokens, fewer than one block of {block_len}; "
                         "give a longer text or a smaller --block-len")
    return token_blocks(tok, text, block_len, max_blocks=max_blocks)


def fit_len(value, flag: str, *models, default: int = 256) -> int:
    """A sequence-length option: unset (None) -> `default` capped at the models' context; set -> checked
    against it, so a too long window fails here, naming the option, not as an index error mid-run."""
    from ..models import context_length
    ctx = [c for c in map(context_length, models) if c is not None]
    if value is None:
        return min([default, *ctx])
    if ctx and value > min(ctx):
        raise ValueError(f"{flag}: {value} tokens exceed the model's context of {min(ctx)} "
                         "(max_position_embeddings); give at most that")
    return value


def load_any(path, device=None, dtype=None):
    """(model, tokenizer, record): a directory saved by `sdft degrade`/`sdft recover` or any HF causal LM
    (None = the embedded default model) in `dtype` (default float32), moved to `device` if given."""
    import torch
    from ..io import load_model_dir
    from ..models import load_model
    dtype = dtype or torch.float32
    if path is None:
        (m, t), r = load_model(None, dtype=dtype), None
    else:
        m, t, r = load_model_dir(path, dtype=dtype)
    if device is not None:
        m.to(device)
    return m, t, r


def add_layer_map_arg(p):
    p.add_argument("--layer-map", default=None, metavar="MAP",
                   help="student block -> teacher block: comma-separated teacher indices, one per student "
                        "block (e.g. 0,2,5), or 'uniform' (evenly spaced, last onto last); default: the "
                        "student's degradation record, else the identity")


def parse_layer_map(text):
    """--layer-map's value: None, "uniform" or a list of ints (range-checked once the models are loaded)."""
    if text is None or text.strip().lower() == "uniform":
        return None if text is None else "uniform"
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--layer-map: expected comma-separated teacher block indices (e.g. 0,2,5) or "
                         f"'uniform', got {text!r}") from None


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Student block i -> teacher block ceil((i + 1) * n_teacher / n_student) - 1: evenly spaced, the last
    onto the last (the blocks whose outputs a shallower model's blocks most plausibly stand for)."""
    return [-(-(i + 1) * n_teacher // n_student) - 1 for i in range(n_student)]


def load_pair(teacher_path, student_path, device=None, dtype=None, layer_map=None):
    """Teacher and student, checked compatible (tokenizer, vocabulary, layer map) before any work, both
    in `dtype` (default float32) and moved to `device` if given. layer_map (parse_layer_map's value)
    overrides the student's degradation record."""
    from ..align import check_layer_map, _layers
    from ..recover import check_compatible
    teacher, ttok, _ = load_any(teacher_path, dtype=dtype)
    student, stok, record = load_any(student_path, dtype=dtype)
    check_compatible(teacher, student, ttok, stok)
    n_s, n_t = len(_layers(student)), len(_layers(teacher))
    if layer_map == "uniform":
        layer_map = uniform_layer_map(n_s, n_t)
    elif layer_map is None:
        layer_map = record["layer_map"] if record else None
    try:
        layer_map = check_layer_map(layer_map, n_s, n_t)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{exc} (--layer-map sets it)") from None
    teacher.eval().requires_grad_(False)
    if device is not None:
        teacher.to(device), student.to(device)
    return teacher, ttok, student, stok, record, layer_map


def emit(obj, out_path=None):
    """Print a JSON result and optionally write it atomically to out_path."""
    from ..io import atomic_write_json, to_jsonable
    if out_path:
        atomic_write_json(out_path, obj)
    json.dump(to_jsonable(obj), sys.stdout, indent=2)
    sys.stdout.write("\n")


def friendly(fn):
    """Bad input (ValueError/TypeError/FileNotFoundError/FileExistsError raised by the checks) -> one clear line on
    stderr and exit status 2, instead of a traceback. Set SDFT_TRACEBACK=1 to see the traceback."""
    import functools
    import os

    @functools.wraps(fn)
    def wrapper(args):
        try:
            return fn(args)
        except (ValueError, TypeError, FileNotFoundError, FileExistsError) as exc:
            if os.environ.get("SDFT_TRACEBACK"):
                raise
            print(f"sdft {getattr(args, 'command', '')}: error: {exc}", file=sys.stderr)
            return 2
    return wrapper
