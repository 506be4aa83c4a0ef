"""Helpers shared by the degradations: argument checks, finding decoder blocks and their linear layers,
and running calibration text through the decoder block by block (GPTQ and Wanda need each block's
inputs as produced by the already-degraded blocks before it)."""
from __future__ import annotations

import copy

import torch
from torch import nn


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


def check_finite_weights(targets) -> None:
    """Refuse to degrade weights that already hold NaN/Inf (the result would be meaningless)."""
    for name, _, _, lin in targets:
        if not bool(torch.isfinite(lin.weight).all()):
            raise ValueError(f"model: layer {name} has NaN/Inf weights")


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
    """A deep copy in eval mode, its decoder blocks' HF Conv1D layers turned into nn.Linear (see
    linearize_conv1d); the caller's model is never touched."""
    new = copy.deepcopy(model)
    linearize_conv1d(new)
    new.eval()
    return new


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for these helpers
        return None
    return Conv1D


def linearize_conv1d(model: nn.Module) -> int:
    """Replace, in place, every Hugging Face Conv1D inside the decoder blocks (GPT-2's c_attn, c_proj,
    c_fc: y = x @ W + b with W stored [in, out]) by the nn.Linear computing the same function (weight
    W.T, [out, in]), so the degradations, which work on nn.Linear, apply to GPT-2-style models too.
    io.save_model_dir transposes them back, so the saved directory loads into the original class.
    Returns the number of layers replaced."""
    conv1d = _conv1d_type()
    if conv1d is None:
        return 0
    count = 0
    for layer in decoder_layers(model):
        for parent in list(layer.modules()):
            for attr, child in list(parent.named_children()):
                if type(child) is conv1d:
                    w = child.weight
                    lin = nn.Linear(w.shape[0], w.shape[1], bias=child.bias is not None,
                                    device=w.device, dtype=w.dtype)
                    with torch.no_grad():
                        lin.weight.copy_(w.t())
                        if child.bias is not None:
                            lin.bias.copy_(child.bias)
                    lin.weight.requires_grad_(w.requires_grad)
                    if child.bias is not None:
                        lin.bias.requires_grad_(child.bias.requires_grad)
                    setattr(parent, attr, lin)
                    count += 1
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
