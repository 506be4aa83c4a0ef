"""Atomic writes for everything a run saves, and checkpoint save/load.

Every writer goes through a temporary file in the destination's own directory followed by `os.replace`,
which is atomic on POSIX: a reader (or a resumed run) sees either the old file or the whole new one,
never a half-written one, even if the process is killed mid-write.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_stream(path: str | os.PathLike, write) -> Path:
    """Write `path` atomically through write(binary_file): a temp file in the same directory, fsync,
    os.replace; the temp file is removed on any failure (an exception or a kill leaves the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write_stream(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Tensors, numpy values, paths, tuples and non-finite floats -> plain JSON values.

    NaN/Inf become None (JSON has no NaN); the caller decides how to report them.
    """
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        return to_jsonable(obj.item() if obj.ndim == 0 else obj.tolist())
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy arrays and scalars
        return to_jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return str(obj)
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, sort_keys=False)
    return atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def atomic_write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]],
                     fieldnames: list[str] | None = None) -> Path:
    """Rows of dicts -> CSV; columns are the union of keys in first-seen order unless given."""
    rows = [to_jsonable(dict(r)) for r in rows]
    if fieldnames is None:
        fieldnames = []
        for r in rows:
            fieldnames.extend(k for k in r if k not in fieldnames)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fieldnames})
    return atomic_write_text(path, buf.getvalue())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write_stream(path, lambda f: torch.save(obj, f))  # streamed: no second copy in memory


def torch_load(path: str | os.PathLike) -> Any:
    # Checkpoints hold RNG states and optimizer state (plain tensors/dicts): weights_only stays safe.
    return torch.load(path, map_location="cpu", weights_only=False)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: drop it, the checkpoint decides
                    break
    return out


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> Path:
    text = "".join(json.dumps(to_jsonable(r), allow_nan=False) + "\n" for r in records)
    return atomic_write_text(path, text)


def atomic_replace_dir(src_tmp: Path, dst: Path) -> Path:
    """Move a fully written temporary directory into place, replacing `dst` (old copy removed after)."""
    dst = Path(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(src_tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(dst.parent)
    return dst


def make_tmp_dir(dst: str | os.PathLike) -> Path:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))


# ---------------------------------------------------------------------------------------------------
# Degraded / recovered models on disk.
#
# Layout of a saved model directory:
#   config.json, model.safetensors, tokenizer files  - a PLAIN Hugging Face model (QuantLinear layers
#       replaced by nn.Linear holding the dequantised weight, pruning masks baked in), loadable by any
#       HF tool with AutoModelForCausalLM.from_pretrained;
#   sdft_state.pt   - the exact training state: latent weights, quantisation scales/zero points,
#       pruning masks, and the per-layer quantisation spec, so `load_model_dir` rebuilds the very
#       same compressed model (training it keeps it compressed);
#   degradation.json - the degradation record (kind, params, layer_map, ...).
# ---------------------------------------------------------------------------------------------------

def _plain_copy(model):
    """A fresh model of the same class whose weights are what `model` computes with: every QuantLinear's
    dequantised weight, every pruned weight with its mask applied (orig * mask). Built from the state
    dict, not deepcopy (a pruned module holds a non-leaf `weight` that cannot be deep-copied)."""
    import copy
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(_decoder_layers(model))
    effective = {}
    quant = {n: m for n, m in model.named_modules() if hasattr(m, "quantized_weight") and hasattr(m, "scales")}
    for n, m in quant.items():
        effective[f"{n}.weight"] = m.quantized_weight().detach()
    for n, m in model.named_modules():
        for hook in getattr(m, "_forward_pre_hooks", {}).values():
            name = getattr(hook, "_tensor_name", None)
            if name is not None and hasattr(m, f"{name}_mask"):
                effective[f"{n}.{name}"] = (getattr(m, f"{name}_orig") * getattr(m, f"{name}_mask")).detach()
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(("_mask", ".scales", ".zeros")) and k.rsplit(".", 1)[0] in quant or k.endswith("_mask"):
            continue
        k = k[:-5] if k.endswith("_orig") else k
        sd[k] = effective.get(k, v)
    if getattr(config, "tie_word_embeddings", False):
        # A quantized head (include_lm_head) computes with other weights than the embedding it was tied
        # to: untie, or save_pretrained would store one of them and from_pretrained tie both to it.
        names = {id(m): n for n, m in model.named_modules()}
        key_in = names.get(id(model.get_input_embeddings()), "") + ".weight"
        key_out = names.get(id(model.get_output_embeddings()), "") + ".weight"
        if key_in in sd and key_out in sd and not torch.equal(sd[key_in], sd[key_out]):
            config.tie_word_embeddings = False
    with torch.device("meta"):
        plain = type(model)(config)
    _conv1d_layout(model, plain, sd)
    _fused_experts_layout(model, sd)
    plain.load_state_dict(sd, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval()


def _conv1d_layout(model, plain, sd) -> None:
    """The degradations compute GPT-2's Conv1D layers as nn.Linear (degrade.common.linearize_blocks):
    give those weights back the Conv1D layout [in, out] of the class they are saved as. Decided by the
    module types, not the shapes (a square weight looks the same either way)."""
    from .degrade.common import _linear_like_types
    transposed = tuple(t for t, tr in _linear_like_types().items() if tr)
    for n, m in plain.named_modules():
        if isinstance(m, transposed) and type(model.get_submodule(n)) is not type(m):
            sd[f"{n}.weight"] = sd[f"{n}.weight"].t().contiguous()


def _fused_experts_layout(model, sd) -> None:
    """The degradations compute fused MoE experts as per-expert nn.Linear layers (degrade.experts): stack
    the weights they compute with back into the fused parameters of the class they are saved as."""
    from .degrade.experts import UnfusedExperts
    for n, m in model.named_modules():
        if isinstance(m, UnfusedExperts):
            for fused, part in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
                w = torch.stack([sd.pop(f"{n}.{part}.{e}.weight") for e in range(m.num_experts)])
                sd[f"{n}.{fused}"] = w


def _structure(model) -> dict:
    from torch.nn.utils import prune
    quant = {n: {"bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric}
             for n, m in model.named_modules() if hasattr(m, "quantized_weight") and hasattr(m, "scales")}
    masks = []
    for n, m in model.named_modules():
        for hook in getattr(m, "_forward_pre_hooks", {}).values():
            if isinstance(hook, prune.BasePruningMethod):
                masks.append([n, hook._tensor_name])
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    # a tied head that computes with other weights (quantized) is saved untied in the plain copy; the
    # compressed model shares one latent weight, and gets it back on load
    tied = out_emb is not None and getattr(out_emb, "weight", None) is in_emb.weight
    return {"quant": quant, "masks": masks, "tied": bool(tied)}


def check_model_out(path: str | os.PathLike, name: str = "--out") -> Path:
    """A model directory may only replace nothing, an empty directory or an earlier model directory (it
    has a config.json): replacing anything else would delete unrelated files. Call before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{name}: {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise FileExistsError(f"{name}: {path} is a non-empty directory that holds no saved model (no "
                              "config.json); it would be replaced as a whole: choose a new or empty directory")
    return path


def save_model_dir(model, tokenizer, path: str | os.PathLike, record: dict | None = None) -> Path:
    """Save a (possibly quantized / pruned) causal LM atomically: the directory appears whole or not,
    replacing an earlier model directory at `path` (anything else there is refused: check_model_out)."""
    from .align import unwrap
    model = unwrap(model)
    path = check_model_out(path, "path")
    tmp = make_tmp_dir(path)
    try:
        plain = _plain_copy(model)
        plain.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        st = _structure(model)
        if st["quant"] or st["masks"]:
            sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # loadable without a GPU
            torch.save({"structure": st, "state_dict": sd}, tmp / "sdft_state.pt")
        if record is not None:
            (tmp / "degradation.json").write_text(json.dumps(to_jsonable(record), indent=2) + "\n")
        atomic_replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _decoder_layers(model):
    from .models import decoder_layers
    return decoder_layers(model)


def load_model_dir(path: str | os.PathLike, dtype=torch.float32):
    """Load a model directory written by `save_model_dir` (or any HF causal LM directory).

    Returns (model, tokenizer, record or None). QuantLinear layers and pruning masks are rebuilt from
    sdft_state.pt so the model is exactly the saved compressed model."""
    from torch.nn.utils import prune
    from .models import load_model

    path = Path(path)
    model, tok = load_model(path, dtype=dtype)
    rec_path = path / "degradation.json"
    record = read_json(rec_path) if rec_path.exists() else None
    state_path = path / "sdft_state.pt"
    if state_path.exists():
        from .degrade.common import linearize_blocks
        from .degrade.quantize import QuantLinear
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        linearize_blocks(model)  # the compressed state was saved from nn.Linear layers (as degraded)
        st, sd = saved["structure"], saved["state_dict"]
        for name, spec in st["quant"].items():
            lin = model.get_submodule(name)
            q = QuantLinear(lin.weight, lin.bias, spec["bits"], spec["group_size"], spec["symmetric"],
                            scales=sd[f"{name}.scales"], zeros=sd[f"{name}.zeros"])
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, q)
        for name, tensor_name in st["masks"]:
            mod = model.get_submodule(name)
            prune.custom_from_mask(mod, tensor_name, sd[f"{name}.{tensor_name}_mask"])
        missing, unexpected = model.load_state_dict(sd, strict=False)
        # tied weights may be absent from one side; anything else is a real mismatch
        bad = [k for k in list(missing) + list(unexpected) if "lm_head" not in k and "embed_tokens" not in k]
        if bad:
            raise ValueError(f"path: {path}/sdft_state.pt does not match the saved model ({bad[:5]} ...)")
        if st.get("tied") and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
            model.config.tie_word_embeddings = True
    model.eval()
    return model, tok, record
