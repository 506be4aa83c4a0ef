"""Pruning: removal of whole decoder blocks chosen by angular distance (Gromov et al. 2024, "The
Unreasonable Ineffectiveness of the Deeper Layers"), unstructured magnitude / Wanda sparsity (Sun et al.
2023, "A Simple and Effective Pruning Approach for Large Language Models") and 2:4 semi-structured
sparsity. Weight masks go through torch.nn.utils.prune, so a pruned layer computes with
weight = weight_orig * weight_mask and further training (SDFT) cannot revive pruned weights."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from .common import (block_linears, check_calib, check_targets, copy_model, decoder_layers, identity_map,
                     layers_attr_path, model_device, record, run_blocks_sequentially)

METHODS = ("magnitude", "wanda")


def _check_int(name, v, lo=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")


@torch.no_grad()
def block_input_states(model: nn.Module, calib_ids: torch.Tensor, attention_mask=None, batch_size: int = 8):
    """Hidden state at the last non-pad token of every sequence, at the input of each decoder block
    and at the output of the last block: float64 [L + 1, n, d]. (Hooks rather than
    output_hidden_states, whose last entry is after the final norm.)"""
    layers = decoder_layers(model)
    L = len(layers)
    per_batch = []
    cur = {}
    handles = []

    def pre(i):
        def f(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            cur[i] = h
        return f

    def post(mod, args, out):
        cur[L] = out[0] if isinstance(out, (tuple, list)) else out

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
    handles.append(layers[-1].register_forward_hook(post))
    dev = model_device(model)
    was_training = model.training
    model.eval()
    try:
        for b in range(0, calib_ids.shape[0], batch_size):
            ids = calib_ids[b:b + batch_size].to(dev)
            am = None if attention_mask is None else attention_mask[b:b + batch_size].to(dev)
            cur.clear()
            model(input_ids=ids, attention_mask=am, use_cache=False)
            if am is None:
                last = torch.full((ids.shape[0],), ids.shape[1] - 1, device=dev)
            else:  # position of the last kept token (works for left and right padding)
                pos = torch.arange(ids.shape[1], device=dev).expand_as(ids)
                last = torch.where(am.bool(), pos, -1).amax(dim=1)
            rows = torch.arange(ids.shape[0], device=dev)
            per_batch.append(torch.stack([cur[i][rows, last].double() for i in range(L + 1)]))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return torch.cat(per_batch, dim=1)


def angular_distances(states: torch.Tensor, n: int) -> torch.Tensor:
    """d(l, n) = arccos(cos(h_l, h_{l+n})) / pi averaged over samples, for l = 0 .. L - n: [L - n + 1]."""
    a, b = states[:-n], states[n:]
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
    return (torch.arccos(cos) / math.pi).mean(dim=1)


def remove_blocks(model: nn.Module, removed: list[int]) -> list[int]:
    """Drop the given decoder blocks in place; renumber layer_idx attributes (KV-cache slots) and the
    config so generation with a cache works. Returns the layer map (kept teacher indices)."""
    layers = decoder_layers(model)
    keep = [i for i in range(len(layers)) if i not in set(removed)]
    parent, attr = layers_attr_path(model)
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    for new_idx, old_idx in enumerate(keep):
        for mod in layers[old_idx].modules():
            if hasattr(mod, "layer_idx") and isinstance(mod.layer_idx, int):
                mod.layer_idx = new_idx
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == len(layers):
        cfg.layer_types = [layer_types[i] for i in keep]
    return keep


def prune_blocks(model: nn.Module, n: int, calib_ids: torch.Tensor, *, attention_mask=None, batch_size: int = 8):
    """Remove the n consecutive decoder blocks whose input and output (the input n blocks later) are
    closest in angle on calibration text. Record: "distances" (d(l, n) for every start l), "removed",
    "layer_map", and "distances_all" (the curve for every block count 1 .. L-1)."""
    L = len(decoder_layers(model))
    _check_int("n", n)
    if n >= L:
        raise ValueError(f"n: cannot remove {n} blocks from a model with {L} decoder blocks (need n < {L})")
    calib_ids = check_calib(calib_ids)
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(calib_ids.shape):
        raise ValueError(f"attention_mask: expected shape {tuple(calib_ids.shape)}, got {tuple(attention_mask.shape)}")
    if attention_mask is not None and bool((attention_mask.sum(dim=1) == 0).any()):
        raise ValueError("attention_mask: a calibration sequence has no kept token")
    _check_int("batch_size", batch_size)
    states = block_input_states(model, calib_ids, attention_mask, batch_size)
    if not bool(torch.isfinite(states).all()):
        raise FloatingPointError("prune_blocks: the model produced NaN/Inf hidden states on calib_ids")
    dist = angular_distances(states, n)
    start = int(torch.argmin(dist))
    removed = list(range(start, start + n))
    new = copy_model(model)
    keep = remove_blocks(new, removed)
    all_n = {str(k): angular_distances(states, k).tolist() for k in range(1, L)}
    params = {"n": n, "calibration_sequences": int(calib_ids.shape[0]), "calibration_tokens": int(calib_ids.numel())}
    return new, record("prune_blocks", params, keep, distances=dist.tolist(), removed=removed, start=start,
                       min_distance=float(dist[start]), distances_all=all_n, num_layers_before=L,
                       num_layers_after=len(keep))


class _ColumnNorms:
    """Running sum of squares of each input feature: ||X_j||_2^2 over all calibration tokens."""

    def __init__(self, n_in, device):
        self.sq = torch.zeros(n_in, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x):
        self.sq += x.detach().double().pow(2).sum(dim=0)
        self.n += x.shape[0]


def _scores(lin, method, norms):
    w = lin.weight.detach().abs().double()
    return w if method == "magnitude" else w * norms.sq.sqrt().unsqueeze(0)


def _unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep-mask pruning exactly round(sparsity * count) lowest scores (per row or per layer)."""
    if per_row:
        k = int(round(sparsity * score.shape[1]))
        mask = torch.ones_like(score, dtype=torch.bool)
        if k:
            idx = torch.argsort(score, dim=1, stable=True)[:, :k]
            mask.scatter_(1, idx, False)
        return mask
    k = int(round(sparsity * score.numel()))
    flat = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        flat[torch.argsort(score.flatten(), stable=True)[:k]] = False
    return flat.view_as(score)


def _two_four_mask(score: torch.Tensor) -> torch.Tensor:
    """Keep the 2 highest scores in every group of 4 consecutive input weights of each row."""
    out_f, in_f = score.shape
    grp = score.reshape(out_f, in_f // 4, 4)
    top = torch.topk(grp, 2, dim=-1).indices
    mask = torch.zeros_like(grp, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(out_f, in_f)


def _apply_masks(model, calib_ids, method, batch_size, mask_fn):
    """Mask every decoder-block linear; Wanda statistics are gathered block by block on the
    partially pruned model (as in Wanda's reference procedure)."""
    kept = pruned = 0
    layers = []

    def prune_layer(name, lin, norms):
        nonlocal kept, pruned
        # a MoE expert no calibration token was routed to has no input norms: scored by magnitude
        scored = "magnitude" if norms is None or norms.n == 0 else method
        mask = mask_fn(_scores(lin, scored, norms))
        tprune.custom_from_mask(lin, "weight", mask.to(lin.weight.device))
        z = int((~mask).sum())
        pruned, kept = pruned + z, kept + mask.numel() - z
        layers.append({"name": name, "shape": list(mask.shape), "sparsity": z / mask.numel(), "scores": scored})

    targets = block_linears(model)
    check_targets(model, targets)
    if method == "magnitude":
        for name, _, _, lin in targets:
            prune_layer(name, lin, None)
    else:
        modules = dict(model.named_modules())
        run_blocks_sequentially(model, calib_ids, batch_size,
                                lambda name, lin: _ColumnNorms(lin.in_features, lin.weight.device),
                                lambda li, stats: [prune_layer(n, modules[n], st) for n, st in stats.items()])
    return {"sparsity": pruned / (pruned + kept), "n_weights": pruned + kept, "n_pruned": pruned, "layers": layers}


def _check_method(method, calib_ids, batch_size):
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    _check_int("batch_size", batch_size)
    if method == "wanda":
        return check_calib(calib_ids)
    return None


def prune_unstructured(model: nn.Module, sparsity: float, method: str = "magnitude", calib_ids=None,
                       *, batch_size: int = 8):
    """Zero a fraction `sparsity` of every decoder-block linear's weights. magnitude: the smallest |W|
    over the whole layer; wanda: the smallest |W_ij| * ||X_j||_2 within each output row (X: calibration
    inputs of the layer). Record: "sparsity" achieved over all pruned layers and per layer."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity: expected a float in [0, 1), got {sparsity!r}")
    calib_ids = _check_method(method, calib_ids, batch_size)
    new = copy_model(model)
    per_row = method == "wanda"
    acc = _apply_masks(new, calib_ids, method, batch_size, lambda s: _unstructured_mask(s, float(sparsity), per_row))
    params = {"sparsity": float(sparsity), "method": method,
              "granularity": "per output row" if per_row else "per layer"}
    return new, record("prune_unstructured", params, identity_map(new), **acc)


def prune_2_4(model: nn.Module, method: str = "magnitude", calib_ids=None, *, batch_size: int = 8):
    """2:4 semi-structured sparsity: in every group of 4 consecutive input weights of each output row
    keep the 2 with the highest score (|W|, or Wanda's |W| * ||X_j||_2)."""
    calib_ids = _check_method(method, calib_ids, batch_size)
    new = copy_model(model)
    for name, _, _, lin in block_linears(new):
        if lin.in_features % 4:
            raise ValueError(f"model: layer {name} has in_features={lin.in_features}, "
                             "not a multiple of 4 (2:4 needs it)")
    acc = _apply_masks(new, calib_ids, method, batch_size, _two_four_mask)
    return new, record("prune_2_4", {"method": method, "pattern": "2:4"}, identity_map(new), **acc)


def make_pruning_permanent(model: nn.Module) -> nn.Module:
    """Fold masks into the weights (weight_orig * mask -> weight) and drop the pruning hooks."""
    for mod in model.modules():
        if tprune.is_pruned(mod) and hasattr(mod, "weight_mask"):
            tprune.remove(mod, "weight")
    return model
