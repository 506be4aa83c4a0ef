"""Fused mixture-of-experts weights as per-expert nn.Linear layers, so the weight-level degradations
(which work on nn.Linear) reach them.

transformers 5 keeps a MoE block's experts in one module holding 3-D parameters (Mixtral, Qwen2/3-MoE,
OLMoE, DeepSeek-V2/V3, ...): gate_up_proj [E, 2I, H] and down_proj [E, H, I], and computes, for each
token and each of its top-k experts e,
    w_e * down_e(act(gate_e(x)) * up_e(x)),   [gate_e; up_e] = gate_up_proj[e].
UnfusedExperts computes the same with one nn.Linear pair per expert. A module is converted only once
that is checked on a random probe against its own forward, so a layout this does not know (biases,
interleaved gate/up, clamped activations as in GPT-OSS; Llama 4's transposed, batched experts) stays
fused, and check_targets then refuses it.
The router (its bare [E, H] weight) is left at full precision, as MoE quantizers do: it only picks and
weighs experts, and rounding it flips the choice of expert for tokens near a tie.
"""
from __future__ import annotations

import torch
from torch import nn


class UnfusedExperts(nn.Module):
    """The experts of one MoE block as nn.Linear layers: gate_up[e] (H -> 2I), down[e] (I -> H); saved
    fused again by io._fused_experts_layout."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn, share: bool = False):
        super().__init__()
        self.num_experts, self.act_fn = gate_up.shape[0], act_fn
        self.gate_up = nn.ModuleList(_linear(w, share) for w in gate_up)
        self.down = nn.ModuleList(_linear(w, share) for w in down)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():  # the experts the router chose, in order
            if not 0 <= e < self.num_experts:  # (an index E marks a token routed to no local expert)
                continue
            tok, slot = torch.where(top_k_index == e)
            gate, up = self.gate_up[e](hidden_states[tok]).chunk(2, dim=-1)
            y = self.down[e](self.act_fn(gate) * up) * top_k_weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def _linear(w: torch.Tensor, share: bool) -> nn.Linear:
    """An nn.Linear holding a copy of w, or (share: for a probe only) a view of it, so checking a large
    model's experts allocates nothing."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w.detach() if share else w.detach().clone(), requires_grad=w.requires_grad)
    return lin


def is_fused_experts(module: nn.Module) -> bool:
    """Shaped like fused experts: exactly the parameters gate_up_proj [E, 2I, H] and down_proj [E, H, I],
    and an act_fn as its only child module."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) != {"gate_up_proj", "down_proj"} or not hasattr(module, "act_fn"):
        return False
    if any(c is not module.act_fn for c in module.children()):
        return False
    gu, dn = params["gate_up_proj"].shape, params["down_proj"].shape
    return len(gu) == 3 and len(dn) == 3 and gu[0] == dn[0] and gu[1] == 2 * dn[2] and gu[2] == dn[1]


@torch.no_grad()
def matches(module: nn.Module) -> bool:
    """Whether `module` is shaped like fused experts and UnfusedExperts computes what it computes on a
    probe: random tokens, random top-2 routing and weights, to 16 eps of its dtype (on views of its
    weights: nothing is copied)."""
    if not is_fused_experts(module):
        return False
    gu = module.gate_up_proj
    view = UnfusedExperts(gu, module.down_proj, module.act_fn, share=True)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(24, gu.shape[2], generator=g).to(gu.device, gu.dtype)
    idx = torch.randint(0, view.num_experts, (24, min(2, view.num_experts)), generator=g).to(gu.device)
    w = torch.rand(idx.shape, generator=g).to(gu.device, gu.dtype)
    try:
        want = module(x, idx, w)
    except Exception:  # another forward signature: not this kind of module
        return False
    got = view(x, idx, w)
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return False
    tol = 16 * torch.finfo(gu.dtype).eps * max(float(want.abs().max()), 1e-30)
    return float((got - want).abs().max()) <= tol


def unfuse(module: nn.Module) -> UnfusedExperts | None:
    """The UnfusedExperts (its own copy of the weights) computing what `module` computes, or None when
    matches(module) is false."""
    return UnfusedExperts(module.gate_up_proj, module.down_proj, module.act_fn) if matches(module) else None


def unfuse_experts(layer: nn.Module) -> int:
    """Replace, in place, every fused-experts module under `layer` that unfuse() can match by its
    UnfusedExperts. Returns the number replaced (modules it cannot match are left as they are)."""
    count = 0
    for parent in list(layer.modules()):
        for attr, child in list(parent.named_children()):
            new = unfuse(child)
            if new is not None:
                setattr(parent, attr, new)
                count += 1
    return count


def is_router(module: nn.Module) -> bool:
    """A MoE router with a bare weight (transformers 5's *TopKRouter / *TopkRouter / *Router classes)."""
    return type(module).__name__.lower().endswith("router") and not isinstance(module, nn.Linear)
