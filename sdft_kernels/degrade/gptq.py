"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantise a linear layer's weight column by column, each time spreading the rounding
error over the not-yet-quantised columns through the inverse Hessian of the layer-output error,
H = 2 X^T X / N (X: the layer's calibration inputs).

Order: sequential over decoder blocks. Block l's Hessians come from the inputs that the already
quantised blocks 0..l-1 produce (so later blocks compensate earlier errors); inside a block every
linear sees the block's own unquantised sublayers (one calibration pass per block).
The grid (scales, zero points, float16 scales) is the one of quantize.py, so the result is an ordinary
QuantLinear whose latent weight sits exactly on its grid.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .common import (block_linears, check_calib, check_targets, copy_model, identity_map, record,
                     run_blocks_sequentially)
from .quantize import QuantLinear, accounting, check_spec, effective_group, group_params, max_code, rtn_params


class HessianStats:
    """Running H = 2/N sum_n x_n x_n^T over the rows x_n of a layer's inputs (float64)."""

    def __init__(self, n_in: int, device):
        self.H = torch.zeros(n_in, n_in, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        m = x.shape[0]
        if m == 0:
            return
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        self.H.addmm_(x.t(), x, alpha=2.0 / self.n)


def _inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1; row i of U holds the error
    propagation coefficients of column i (U[i, i] is the pivot)."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    base = float(H.diagonal().mean())
    base = base if base > 0 else 1.0
    lam = damp
    for _ in range(6):  # H may be near-singular for tiny calibration sets: raise the damping
        L, info = torch.linalg.cholesky_ex(H + lam * base * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        lam *= 10.0
    raise RuntimeError("GPTQ: the calibration Hessian is not positive definite even with damping 1e4 x mean diag")


def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, bits: int, group_size, symmetric: bool,
                         damp: float = 0.01, block_size: int = 128, act_order: bool = False):
    """GPTQ for one weight W [out, in] with Hessian H [in, in].
    act_order: visit the columns in order of decreasing H diagonal (the inputs with the most energy
    first, while the most columns are left to absorb their error), with static groups: each contiguous
    group's grid is fixed from the original weights beforehand, so the result keeps QuantLinear's
    contiguous group layout. Returns (dequantised weight float32 [out, in], scales [out, G], zeros [out, G])."""
    # The column loop issues many tiny ops; on CPU, thread start-up costs more than it saves for
    # small layers, so such layers run single-threaded.
    small_cpu = W.device.type == "cpu" and W.shape[0] * min(block_size, W.shape[1]) < (1 << 18)
    threads = torch.get_num_threads()
    if small_cpu:
        torch.set_num_threads(1)
    try:
        return _gptq(W, H, bits, group_size, symmetric, damp, block_size, act_order)
    finally:
        if small_cpu:
            torch.set_num_threads(threads)


def _gptq(W, H, bits, group_size, symmetric, damp, block_size, act_order=False):
    W = W.detach().double().clone()
    rows, cols = W.shape
    H = H.double().clone()
    dead = H.diagonal() == 0  # inputs that were always zero: the weight there does not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    g = effective_group(group_size, cols)
    n_groups = math.ceil(cols / g)
    maxq = max_code(bits, symmetric)
    scales = torch.zeros(rows, n_groups, dtype=torch.float32, device=W.device)
    zeros = torch.zeros_like(scales)
    perm = None
    if act_order:
        for j in range(n_groups):  # static grids, from the weights before any error update
            scales[:, j], zeros[:, j] = group_params(W[:, j * g:(j + 1) * g], bits, symmetric)
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
        group_of = (perm // g).tolist()  # permuted column -> its (original, contiguous) group
    U = _inverse_hessian_factor(H, damp)
    Q = torch.zeros_like(W)
    s = z = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if act_order:
                s, z = scales[:, group_of[c]].double(), zeros[:, group_of[c]].double()
            elif c % g == 0:
                # The group's grid is set from its current, error-updated values: columns inside this
                # block from W1, later columns from W plus this block's pending (lazy) updates.
                gend = min(c + g, cols)
                grp = W1[:, i:i + (gend - c)]
                if gend > i2:
                    beyond = W[:, i2:gend] - Err1[:, :i] @ U[i1:c, i2:gend]
                    grp = torch.cat([grp, beyond], dim=1)
                s32, z32 = group_params(grp, bits, symmetric)
                scales[:, c // g], zeros[:, c // g] = s32, z32
                s, z = s32.double(), z32.double()
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            wq = (q - z) * s
            Q1[:, i] = wq
            err = (w - wq) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        if i2 < cols:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of the remaining columns
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q.float(), scales, zeros


def proxy_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): twice the mean squared layer-output error over the calibration rows."""
    D = (W.double() - Q.double())
    return float(((D @ H) * D).sum())


def quantize_gptq(model: nn.Module, calib_ids: torch.Tensor, bits: int, group_size: int | None = 128,
                  symmetric: bool = True, *, damp: float = 0.01, block_size: int = 128, batch_size: int = 8,
                  act_order: bool = False):
    """GPTQ weight quantization of every nn.Linear in the decoder blocks, calibrated on calib_ids
    (LongTensor [n, T]); act_order: see gptq_quantize_weight. Returns (quantized copy, record); the
    layers are QuantLinear modules."""
    check_spec(bits, group_size, symmetric)
    calib_ids = check_calib(calib_ids)
    if not (isinstance(damp, (int, float)) and damp > 0):
        raise ValueError(f"damp: expected a positive float, got {damp!r}")
    if not isinstance(act_order, bool):
        raise ValueError(f"act_order: expected a bool, got {act_order!r}")
    for name, v in (("block_size", block_size), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    new = copy_model(model)
    check_targets(new, block_linears(new))
    pairs, per_layer = [], {}
    modules = dict(new.named_modules())

    def apply(block_idx, stats):
        for name, st in stats.items():
            parent_name, attr = name.rsplit(".", 1)
            lin = modules[name]
            W0 = lin.weight.detach()
            if not bool(torch.isfinite(st.H).all()):
                raise FloatingPointError(f"quantize_gptq: NaN/Inf calibration activations at the input of {name}")
            s_rtn, z_rtn = rtn_params(W0, bits, group_size, symmetric)
            ql_rtn = QuantLinear(W0.clone(), None, bits, group_size, symmetric, s_rtn, z_rtn)
            if st.n == 0:
                # a MoE expert no calibration token was routed to: H = 0 tells nothing (GPTQ would zero
                # every column as dead), so it is rounded to nearest
                ql = QuantLinear(W0.clone(), lin.bias, bits, group_size, symmetric, s_rtn, z_rtn)
            else:
                Q, sc, zr = gptq_quantize_weight(W0, st.H, bits, group_size, symmetric, damp, block_size, act_order)
                ql = QuantLinear(Q.to(W0.dtype), lin.bias, bits, group_size, symmetric, sc, zr)
            setattr(modules[parent_name], attr, ql)
            pairs.append((name, W0.clone(), ql))
            per_layer[name] = {"gptq_proxy_loss": proxy_loss(W0, ql.quantized_weight(), st.H),
                               "rtn_proxy_loss": proxy_loss(W0, ql_rtn.quantized_weight(), st.H),
                               "calib_rows": st.n, "method": "gptq" if st.n else "rtn (no calibration rows)"}

    run_blocks_sequentially(new, calib_ids, batch_size,
                            lambda name, lin: HessianStats(lin.in_features, lin.weight.device), apply)
    acc = accounting(pairs)
    for entry in acc["layers"]:
        entry.update(per_layer[entry["name"]])
    params = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "damp": damp,
              "block_size": block_size, "act_order": act_order, "include_lm_head": False}
    calib = {"sequences": int(calib_ids.shape[0]), "tokens": int(calib_ids.numel()),
             "order": "sequential over decoder blocks"}
    return new, record("quantize_gptq", params, identity_map(new), calibration=calib, **acc)
