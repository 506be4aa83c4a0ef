"""The (weight, bias) a causal LM's logits come from, for the fused losses, which multiply the final hidden
states by the output head themselves instead of calling the model's head.

That is only right when logits = hidden @ W.T + b exactly. Some models transform the head's output:
Cohere multiplies the logits by config.logit_scale, Granite divides them by config.logits_scaling
(both linear: folded into W and b here), Gemma 2 soft-caps them, c * tanh(logits / c) (`softcap`:
the fused loss applies it per chunk). A QuantLinear head computes with its fake-quantized weight
(straight-through, as in its forward), and a LoRA-adapted head's adapters are not in its .weight
(refused). `check_head` verifies the result against the model's own logits once, so an architecture
with a transform not listed here is refused, instead of being trained on other logits than it computes.
"""
from __future__ import annotations

import torch

from .align import unwrap as _hf  # the HF model inside DDP / FSDP / peft wrappers

__all__ = ["head_params", "linear_params", "check_head", "logit_scale", "softcap"]


def _text_config(model):
    cfg = getattr(_hf(model), "config", None)
    return getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None


def softcap(model):
    """The model's final-logit soft-cap c (logits = c * tanh(head / c)), or None."""
    cap = getattr(_text_config(model), "final_logit_softcapping", None)
    return float(cap) if cap else None


def logit_scale(model, name: str = "model") -> float:
    """The factor the model multiplies its head's output by (1.0 for most), before any soft-cap."""
    cfg = _text_config(model)
    scale = float(getattr(cfg, "logit_scale", None) or 1.0)           # Cohere
    scaling = getattr(cfg, "logits_scaling", None)                     # Granite
    return scale / float(scaling) if scaling else scale


def linear_params(head, name: str = "head"):
    """(weight, bias) a linear head module computes with: a QuantLinear's straight-through fake-quantized
    weight; LoRA adapters on it are refused (reading its weight would ignore them)."""
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"{name}: expected a linear output head (with .weight [V, H])")
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise ValueError(f"{name}: the output head carries LoRA adapters, which the fused loss (reading the "
                         "head's weight) would ignore; leave lm_head out of the LoRA target modules")
    w = head.effective_weight() if hasattr(head, "effective_weight") else head.weight
    return w, getattr(head, "bias", None)


def head_params(model, name: str = "model"):
    """(weight [V, H], bias [V] or None) with logits = final_hidden @ weight.T + bias (before any soft-cap),
    gradient-carrying for the student: linear_params of its output head, the logit scale folded in."""
    w, b = linear_params(_hf(model).get_output_embeddings(), name)
    s = logit_scale(model, name)
    if s != 1.0:
        w, b = w * s, None if b is None else b * s
    return w, b


@torch.no_grad()
def check_head(model, final_hidden, input_ids, name: str = "model") -> None:
    """Refuse a model whose logits are not final_hidden(model, ids) @ W.T + b with head_params' (W, b):
    one forward on at most 8 tokens of one row. final_hidden(model, ids) -> [B, T, H]."""
    hf = _hf(model)
    was = hf.training
    hf.eval()
    # in the model's own precision (a training loop's autocast would add its rounding to the comparison)
    autocast_off = torch.autocast(input_ids.device.type, enabled=False)
    try:
        autocast_off.__enter__()
        ids = input_ids[:1, :8]
        full = hf(input_ids=ids, use_cache=False).logits.float()
        w, b = head_params(hf, name)
        got = torch.nn.functional.linear(final_hidden(hf, ids).to(w.dtype), w, b).float()
        cap = softcap(hf)
        got = got if cap is None else cap * torch.tanh(got / cap)
    finally:
        autocast_off.__exit__(None, None, None)
        hf.train(was)
    # 1% of the logits' scale: the model's forward may run under a bf16 autocast of its own (accelerate
    # wraps it for Trainer(bf16=True)), rounding its logits apart from this product; the transforms to
    # catch (a scale, a cap, a projection) change them by far more
    tol = max(1e-2, 4 * torch.finfo(w.dtype).eps) * max(1.0, float(full.abs().max()))
    if got.shape != full.shape or float((got - full).abs().max()) > tol:
        raise ValueError(f"{name}: its logits are not its final hidden states times its output head "
                         f"(largest difference {float((got - full).abs().max()):.3g}); the fused distillation "
                         "loss cannot be used with this architecture")
