"""Weight-only group-wise quantization: round-to-nearest (RTN) here, GPTQ in gptq.py.

Grid convention (one for both methods, so a GPTQ layer and an RTN layer are the same module):
each output row of a weight [out, in] is cut along `in` into groups of `group_size` columns (the last
group may be shorter when group_size does not divide in_features; a group_size >= in_features means
one group per row). A group has a scale s (stored as float16) and an integer zero point z; a weight is
stored as an integer code q in [0, maxq] and represents (q - z) * s.
- symmetric: z = 2^(b-1) - 1, s = max|w| / (2^(b-1) - 1), q in [0, 2^b - 2]: 2^b - 1 levels centred on
  zero (at 2 bits: {-1, 0, +1} * s). Zero-point bits are not stored (z is a constant).
- asymmetric: the range [min(w, 0), max(w, 0)] is split into 2^b - 1 steps, s = range / (2^b - 1),
  z = round(-min / s) in [0, 2^b - 1], q in [0, 2^b - 1]: 2^b levels; z is stored with b bits.
Bits per weight = (b * weights + 16 * groups + (b * groups if asymmetric)) / weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import block_linears, check_targets, copy_model, identity_map, record

ALLOWED_BITS = (2, 3, 4, 8)
SCALE_BITS = 16  # scales are stored (and used) as float16
_FP16_TINY = 2.0 ** -24  # smallest positive float16 (subnormal)


def check_spec(bits, group_size, symmetric) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"bits: expected one of {ALLOWED_BITS}, got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size <= 0):
        raise ValueError(f"group_size: expected a positive int (or None for one group per row), got {group_size!r}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric: expected a bool, got {type(symmetric).__name__}")


def max_code(bits: int, symmetric: bool) -> int:
    return 2 ** bits - 2 if symmetric else 2 ** bits - 1


def effective_group(group_size, in_features: int) -> int:
    return in_features if group_size is None else min(group_size, in_features)


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of w [..., g] (one group per row of the last dim).
    Scales are rounded to float16 so that the exported codes + float16 scales reproduce the
    fake-quantised weight exactly."""
    w = w.float()
    if symmetric:
        half = 2 ** (bits - 1) - 1
        scale = w.abs().amax(dim=-1) / half
        zero = torch.full_like(scale, float(half))
    else:
        maxq = 2 ** bits - 1
        lo = w.amin(dim=-1).clamp(max=0.0)
        hi = w.amax(dim=-1).clamp(min=0.0)
        scale = (hi - lo) / maxq
    # An all-zero group has no range: any positive scale represents it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp_min(_FP16_TINY).to(torch.float16).float().clamp_min(_FP16_TINY)
    if not symmetric:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def rtn_params(w: torch.Tensor, bits: int, group_size, symmetric: bool):
    """Per-group (scales, zeros), each [out, n_groups], for a weight [out, in]."""
    out_f, in_f = w.shape
    g = effective_group(group_size, in_f)
    n_groups = math.ceil(in_f / g)
    pad = n_groups * g - in_f
    # Padding by replicating the last column keeps the last group's min/max unchanged, because that
    # column belongs to the (shorter) last group.
    wp = F.pad(w.float().unsqueeze(0), (0, pad), mode="replicate").squeeze(0) if pad else w.float()
    return group_params(wp.reshape(out_f, n_groups, g), bits, symmetric)


def expand_groups(t: torch.Tensor, group: int, in_features: int) -> torch.Tensor:
    """[out, n_groups] -> [out, in] by repeating each group's value over its columns."""
    return t.repeat_interleave(group, dim=1)[:, :in_features]


def codes_of(w, scales, zeros, bits, group, symmetric) -> torch.Tensor:
    s = expand_groups(scales, group, w.shape[1])
    z = expand_groups(zeros, group, w.shape[1])
    return torch.clamp(torch.round(w.float() / s) + z, 0, max_code(bits, symmetric))


def fake_quant(w, scales, zeros, bits, group, symmetric) -> torch.Tensor:
    """Quantise-dequantise w [out, in] on the given grid (float32 result)."""
    s = expand_groups(scales, group, w.shape[1])
    z = expand_groups(zeros, group, w.shape[1])
    q = torch.clamp(torch.round(w.float() / s) + z, 0, max_code(bits, symmetric))
    return (q - z) * s


class QuantLinear(nn.Linear):
    """A linear layer that always runs with its weight on a fixed quantisation grid.

    `weight` is the latent float weight (a Parameter, so training updates it); `scales`/`zeros` are
    buffers fixed when the layer was quantised. Forward uses fake_quant(weight) with a straight-through
    estimator: the forward value is the quantised weight, the gradient passes to the latent weight
    unchanged. So fine-tuning (SDFT) moves latent weights across grid points while the model the loss
    sees stays quantised. `export()` gives the integer codes and float16 scales.

    It subclasses nn.Linear (without nn.Linear's initialisation) so that tools which adapt linear layers,
    such as peft's LoRA, wrap it and call its quantised forward as the base layer. The degradation code
    itself only converts layers whose type is exactly nn.Linear, so a QuantLinear is never re-quantised."""

    def __init__(self, weight: torch.Tensor, bias, bits: int, group_size, symmetric: bool,
                 scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None):
        nn.Module.__init__(self)
        check_spec(bits, group_size, symmetric)
        self.out_features, self.in_features = weight.shape
        self.bits, self.symmetric = bits, symmetric
        self.group_size = effective_group(group_size, self.in_features)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.detach().clone())
        self.bias = bias
        if scales is None:
            scales, zeros = rtn_params(self.weight.detach(), bits, self.group_size, symmetric)
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("zeros", zeros.float().contiguous())
        self._cache = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size, symmetric: bool) -> "QuantLinear":
        return cls(linear.weight, linear.bias, bits, group_size, symmetric)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with (no gradient path), in the latent weight's dtype."""
        w = self.weight.detach()
        return fake_quant(w, self.scales, self.zeros, self.bits, self.group_size, self.symmetric).to(w.dtype)

    def refresh_scales(self) -> None:
        """Recompute scales and zero points from the current latent weight (RTN grid)."""
        s, z = rtn_params(self.weight.detach(), self.bits, self.group_size, self.symmetric)
        self.scales.copy_(s)
        self.zeros.copy_(z)
        self._cache = None

    def effective_weight(self) -> torch.Tensor:
        """The weight forward computes with: the quantised weight, its gradient passed straight through to
        the latent weight when training (also what the fused losses read from a quantised lm_head)."""
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:
            wq = fake_quant(w, self.scales, self.zeros, self.bits, self.group_size, self.symmetric).to(w.dtype)
            return w + (wq - w).detach()  # straight-through estimator
        # Inference: reuse the quantised weight until the latent weight or the grid changes.
        key = (w._version, w.data_ptr(), self.scales._version, self.scales.data_ptr(), w.device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.quantized_weight())
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def export(self) -> dict:
        """Integer codes [out, in] (uint8), float16 scales and integer zeros [out, n_groups]; dequantize
        with (codes - zeros) * scales per group, which equals quantized_weight() exactly."""
        codes = codes_of(self.weight.detach(), self.scales, self.zeros, self.bits, self.group_size, self.symmetric)
        return {"codes": codes.to(torch.uint8), "scales": self.scales.to(torch.float16),
                "zeros": self.zeros.to(torch.uint8), "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric}

    @staticmethod
    def dequantize(exported: dict) -> torch.Tensor:
        codes = exported["codes"].float()
        g, n = exported["group_size"], codes.shape[1]
        s = expand_groups(exported["scales"].float(), g, n)
        z = expand_groups(exported["zeros"].float(), g, n)
        return (codes - z) * s

    def storage_bits(self) -> int:
        """Bits needed to store the weight: codes + float16 scales (+ zero points if asymmetric)."""
        n_groups = self.scales.numel()
        zero_bits = 0 if self.symmetric else self.bits * n_groups
        return self.bits * self.weight.numel() + SCALE_BITS * n_groups + zero_bits

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}")


def accounting(pairs) -> dict:
    """Record fields for quantized layers: pairs of (name, original weight, QuantLinear)."""
    layers, total_bits, total_w, err2, norm2 = [], 0, 0, 0.0, 0.0
    for name, w0, ql in pairs:
        w0 = w0.detach().float()
        diff = ql.quantized_weight().float() - w0
        e2, n2 = float(diff.pow(2).sum()), float(w0.pow(2).sum())
        err2, norm2 = err2 + e2, norm2 + n2
        total_bits += ql.storage_bits()
        total_w += ql.weight.numel()
        layers.append({"name": name, "shape": [ql.out_features, ql.in_features], "group_size": ql.group_size,
                       "rel_error": math.sqrt(e2 / n2) if n2 > 0 else 0.0})
    return {"layers": layers, "n_weights": total_w, "bits_per_weight": total_bits / total_w,
            "rel_weight_error": math.sqrt(err2 / norm2) if norm2 > 0 else 0.0}


def replace_linears(model, include_lm_head, make_layer) -> dict:
    """Swap the chosen nn.Linear layers of `model` (already a copy) for QuantLinear layers built by
    make_layer(name, linear); returns the accounting part of the record."""
    targets = block_linears(model, include_lm_head=include_lm_head)
    check_targets(model, targets)
    pairs = []
    for name, parent, attr, lin in targets:
        w0 = lin.weight.detach().clone()
        ql = make_layer(name, lin)
        setattr(parent, attr, ql)
        pairs.append((name, w0, ql))
    return accounting(pairs)


def quantize_rtn(model: nn.Module, bits: int, group_size: int | None = 128, symmetric: bool = True,
                 *, include_lm_head: bool = False):
    """Group-wise round-to-nearest weight quantization of every nn.Linear in the decoder blocks
    (and lm_head with include_lm_head=True). Returns (quantized copy, record)."""
    check_spec(bits, group_size, symmetric)
    new = copy_model(model)
    acc = replace_linears(new, include_lm_head,
                          lambda name, lin: QuantLinear.from_linear(lin, bits, group_size, symmetric))
    params = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "include_lm_head": include_lm_head}
    return new, record("quantize_rtn", params, identity_map(new), **acc)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


from .gptq import quantize_gptq  # noqa: E402,F401  (re-exported; gptq builds on the grid defined above)
