"""Helpers shared by the degradations: argument checks, finding decoder blocks and their linear layers,
and running calibration text through the decoder block by block (GPTQ and Wanda need each block's
inputs as produced by the already-degraded blocks before it)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .experts import is_router, matches, unfuse_experts


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (models.decoder_layers when it is available)."""
    try:
        from ..models import decoder_layers as _model_layers
    except ImportError:  # the models module is optional for these helpers
        _model_layers = None
    if _model_layers is not None:
        return _model_layers(model)
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"model: cannot find the decoder blocks of a {type(model).__name__}")


def layers_attr_path(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute name) holding the decoder-block ModuleList, so it can be replaced."""
    layers = decoder_layers(model)
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is layers:
                return parent, name
    raise ValueError("model: decoder blocks are not a child module")  # pragma: no cover


def block_linears(model: nn.Module, include_lm_head: bool = False) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """Every nn.Linear inside the decoder blocks (and optionally lm_head), in execution order:
    (qualified name, parent module, attribute name, linear)."""
    out = []
    layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    for layer in layers:
        for parent in layer.modules():
            for attr, child in parent.named_children():
                if type(child) is nn.Linear:
                    out.append((f"{names[id(parent)]}.{attr}", parent, attr, child))
    if include_lm_head:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not isinstance(head, nn.Linear):
            raise ValueError("include_lm_head: the model has no nn.Linear output head")
        for parent in model.modules():
            for attr, child in parent.named_children():
                if child is head:
                    out.append((names[id(child)], parent, attr, child))
    return out


def check_targets(model: nn.Module, targets) -> None:
    """Refuse, before any work, a model whose decoder-block weights the degradation would not all reach:
    no nn.Linear layers at all, or weight matrices outside them (fused mixture-of-experts weights in a
    layout experts.py cannot unfuse, such as GPT-OSS's, with biases): quantizing or pruning only the
    linear layers would leave those at full precision while the record claimed the model compressed.
    MoE routers are the one exception, kept at full precision on purpose (see experts.py). Also refuses
    weights that already hold NaN/Inf (the result would be meaningless)."""
    if not targets:
        raise ValueError("model: no nn.Linear layers found in the decoder blocks")
    _refuse_outside(model, {id(lin.weight) for *_, lin in targets})
    for name, _, _, lin in targets:
        if not bool(torch.isfinite(lin.weight).all()):
            raise ValueError(f"model: layer {name} has NaN/Inf weights")


def check_degradable(model: nn.Module) -> None:
    """check_targets' coverage check on a model as loaded (no copy): for a study to refuse, before its first
    run, a weight-level degradation it would only reach later. Fused experts count as covered only when
    experts.matches() them, as linearize_blocks will."""
    kinds = (nn.Linear, *_linear_like_types())
    mods = [m for layer in decoder_layers(model) for m in layer.modules()]
    covered = {id(m.weight) for m in mods if type(m) in kinds}
    covered |= {id(p) for m in mods if matches(m) for p in m.parameters()}  # unfused when degraded
    _refuse_outside(model, covered)


def _refuse_outside(model: nn.Module, covered: set) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    mods = [m for layer in decoder_layers(model) for m in layer.modules()]
    covered = covered | {id(p) for m in mods if is_router(m) for p in m.parameters()}
    outside = [f"{names.get(id(p), '?')} {list(p.shape)}" for layer in decoder_layers(model)
               for p in layer.parameters() if p.dim() >= 2 and id(p) not in covered]
    if outside:
        raise ValueError(f"model: its decoder blocks hold {len(outside)} weight tensor(s) outside nn.Linear layers "
                         f"({', '.join(outside[:3])}{', ...' if len(outside) > 3 else ''}; e.g. fused "
                         "mixture-of-experts weights), which this degradation cannot reach: not supported "
                         "(block removal, blocks:N, and forgetting, forget:N, work on any model)")


def check_calib(calib_ids, name: str = "calib_ids") -> torch.Tensor:
    """Calibration tokens as a LongTensor [n, T] (a 1-D sequence becomes one row)."""
    if calib_ids is None:
        raise ValueError(f"{name}: calibration token ids are required for this method")
    if not isinstance(calib_ids, torch.Tensor):
        raise TypeError(f"{name}: expected a LongTensor [n, T], got {type(calib_ids).__name__}")
    if calib_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected integer token ids, got dtype {calib_ids.dtype}")
    if calib_ids.dim() == 1:
        calib_ids = calib_ids.unsqueeze(0)
    if calib_ids.dim() != 2:
        raise ValueError(f"{name}: expected shape [n, T], got {tuple(calib_ids.shape)}")
    if calib_ids.numel() == 0:
        raise ValueError(f"{name}: calibration data is empty (shape {tuple(calib_ids.shape)})")
    return calib_ids.long()


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode, its decoder blocks' linear layers as plain nn.Linear (see
    linearize_blocks); the caller's model is never touched."""
    new = copy.deepcopy(model)
    linearize_blocks(new)
    new.eval()
    return new


def _linear_like_types() -> dict:
    """Layer classes that compute a plain affine map but are not nn.Linear itself: {class: transposed},
    transposed when the weight is stored [in, out]. HF Conv1D (GPT-2's c_attn, c_proj, c_fc:
    y = x @ W + b) and FalconLinear (an nn.Linear subclass with its own forward, same function). Other
    nn.Linear subclasses (QuantLinear, bitsandbytes' 4/8-bit layers) compute something else and are
    left alone."""
    out = {}
    try:
        from transformers.pytorch_utils import Conv1D
        out[Conv1D] = True
    except ImportError:  # transformers is optional for these helpers
        pass
    try:
        from transformers.models.falcon.modeling_falcon import FalconLinear
        out[FalconLinear] = False
    except ImportError:
        pass
    return out


def linearize_blocks(model: nn.Module) -> int:
    """Replace, in place, every linear-like layer (_linear_like_types) inside the decoder blocks by the
    nn.Linear computing the same function, and every fused-experts module experts.unfuse can match by
    per-expert nn.Linear layers, so the degradations, which work on nn.Linear (exactly that type, so a
    QuantLinear is never re-quantized), apply to GPT-2, Falcon and MoE models too. io.save_model_dir
    gives Conv1D weights their [in, out] layout back and re-fuses experts, so a saved directory loads
    into the original classes. Returns the number of modules replaced."""
    kinds = _linear_like_types()
    count = 0
    for layer in decoder_layers(model):
        for parent in list(layer.modules()):
            for attr, child in list(parent.named_children()):
                if type(child) not in kinds:
                    continue
                w = child.weight.t() if kinds[type(child)] else child.weight
                lin = nn.Linear(w.shape[1], w.shape[0], bias=child.bias is not None, device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    lin.weight.copy_(w)
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                lin.requires_grad_(child.weight.requires_grad)
                setattr(parent, attr, lin)
                count += 1
        count += unfuse_experts(layer)
    return count


def identity_map(model: nn.Module) -> list[int]:
    return list(range(len(decoder_layers(model))))


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib_ids: torch.Tensor, batch_size: int):
    """Run the model up to the first decoder block and keep, per batch, the block's positional and
    keyword arguments (hidden states, rotary embeddings, masks). Nothing after block 0 runs."""
    layers = decoder_layers(model)
    captured = []

    def grab(module, args, kwargs):
        captured.append((list(args), dict(kwargs)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    dev = model_device(model)
    try:
        for i in range(0, calib_ids.shape[0], batch_size):
            try:
                model(input_ids=calib_ids[i:i + batch_size].to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _hidden_of(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, h):
    if args:
        return [h] + list(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = h
    return args, kwargs


@torch.no_grad()
def run_blocks_sequentially(model: nn.Module, calib_ids: torch.Tensor, batch_size: int, make_stats, apply):
    """Calibrate block by block. For each block: forward hooks on its linears feed `make_stats(name,
    linear)` objects (with .add(x2d)), then `apply(block_index, {name: stats})` degrades the block,
    then the degraded block is re-run to produce the next block's inputs, so later blocks are
    calibrated on the activations the degraded model really produces."""
    was_training = model.training
    model.eval()
    layers = decoder_layers(model)
    batches = capture_block_inputs(model, calib_ids, batch_size)
    names = {id(m): n for n, m in model.named_modules()}
    try:
        for li, layer in enumerate(layers):
            stats, handles = {}, []
            for mod in layer.modules():
                if type(mod) is nn.Linear:
                    st = make_stats(names[id(mod)], mod)
                    stats[names[id(mod)]] = st

                    def hook(m, inp, out, st=st):
                        x = inp[0]
                        st.add(x.reshape(-1, x.shape[-1]))

                    handles.append(mod.register_forward_hook(hook))
            try:
                for args, kwargs in batches:
                    layer(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            apply(li, stats)
            new_batches = []
            for args, kwargs in batches:
                out = layer(*args, **kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else out
                new_batches.append(_with_hidden(args, kwargs, out))
            batches = new_batches
    finally:
        model.train(was_training)


def record(kind: str, params: dict, layer_map: list[int], **extra) -> dict:
    """The JSON-able record every degradation returns."""
    rec = {"kind": kind, "params": dict(params), "layer_map": [int(i) for i in layer_map]}
    rec.update(extra)
    return rec
