"""Fused linear + distillation divergence: the lm_head matmuls and the fused divergence kernel run chunk
by chunk over tokens, so the full N x V logits never exist.

Per chunk of C tokens: student logits h_s W_s^T (+ b_s) and teacher logits h_t W_t^T (+ b_t) [C, V], the
distill_dense_inplace_ kernel (loss rows + gradient w.r.t. the student logits, already weighted by the
reduction, written over the chunk's student logits: no gradient buffer),
then grad_hidden[c] = G W_s and grad_weight += G^T h_s (float32 accumulator), grad_bias += sum G. Only
those four matmuls run (no recomputation) for the scalar reductions; backward scales the accumulated
gradients by the incoming scalar. reduction="none" cannot fold the per-token incoming gradient into the
weight gradient ahead of time, so it recomputes the chunks in backward (two more matmuls per chunk).
As for distill_loss, backward scales the saved buffers in place in eager mode, so it runs once per
forward (retain_graph=True is refused with a clear error, except for float64), and double backward
(create_graph=True) is refused: the kernel gives first derivatives only.
"""
from __future__ import annotations

import re

import torch

from ..checks import int_at_least
from .distill import (DIVERGENCES, _real, check_not_reused, check_once_differentiable, check_options,
                      check_reverse_mode_only, kernel_row_weights, report_bad_rows, row_weights, traced, valid_rows)

__all__ = ["fused_linear_distill_loss", "DEFAULT_CHUNK_BYTES", "CUDA_CHUNK_BYTES"]

DEFAULT_CHUNK_BYTES = 256 * 2**20  # one chunk's logits (student, overwritten by its gradient, and teacher)
# On CUDA a larger budget: each chunk's weight-gradient GEMM reads and writes the whole float32 [V, H]
# accumulator (1 GiB at V=128256, H=2048), so 512-row chunks of Liger's setting would move 32 GiB of it
# over N=8192 (~10 ms at H200 bandwidth, next to ~35 ms of GEMMs); 2048-row chunks move 8 GiB.
CUDA_CHUNK_BYTES = 2**30


def _chunk_rows(n, vocab, elem_bytes, chunk_size, device_type="cpu"):
    if chunk_size is not None:
        return int_at_least(chunk_size, "chunk_size", 1)
    budget = CUDA_CHUNK_BYTES if device_type == "cuda" else DEFAULT_CHUNK_BYTES
    rows = budget // max(1, 2 * vocab * elem_bytes)
    if rows >= 64:
        rows -= rows % 64  # whole GEMM tiles
    return int(max(1, min(n, rows)))


def _linear_into(out, x, w, b):
    """x @ w.T (+ b) written into out (no new tensor)."""
    if b is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(b, x, w.t(), out=out)


# addmm with out_dtype (a bf16/fp16 GEMM that adds its float32 accumulators into a float32 output) has
# a CUDA kernel only; the overload's presence says the torch build knows it. Tracing it (torch.compile,
# fake tensors) needs torch >= 2.13: before, the plain addmm decomposition took the overload and failed
# (seen with 2.11+cu130, the GPU machines' torch), so there it runs in eager mode only.
_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")
_ADDMM_OUT_DTYPE_TRACES = _ADDMM_OUT_DTYPE and torch.__version__ >= "2.13"


def _add_product_fp32_(acc, a, b):
    """acc += a @ b for bf16/fp16 a, b and a float32 acc. On CUDA the GEMM's float32 accumulators go into
    acc directly: no per-chunk rounding of the weight gradient to bf16 and no [V, H] temporary (0.5 GB
    a chunk at V=128256, H=2048). Elsewhere the product is formed in the input dtype (its GEMM still
    accumulates in float32 inside) and added."""
    if acc.device.type == "cuda" and _ADDMM_OUT_DTYPE and (_ADDMM_OUT_DTYPE_TRACES or not traced(acc)):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(a @ b)


def _softcap_(logits, cap):
    """logits <- cap * tanh(logits / cap), in place (Gemma 2's final-logit soft-capping)."""
    return logits.div_(cap).tanh_().mul_(cap)


def _chunks(sh, sw, sb, th, tw, tb, valid, row_w, div, beta, tau, vocab, chunk, want, caps=(None, None)):
    """One pass over the token chunks. row_w [N] weights each row's loss (None: no gradient wanted).
    caps: (student, teacher) soft-cap of the logits or None. Returns rows [N] float32/64 and, when
    gradients are wanted, (grad_h, grad_w fp32, grad_b fp32)."""
    n = sh.shape[0]
    need_h, need_w, need_b = want
    grad = row_w is not None
    acc = torch.float64 if sh.dtype == torch.float64 else torch.float32
    rows = torch.empty(n, dtype=acc, device=sh.device)
    gh = torch.empty_like(sh) if grad and need_h else None
    gw = torch.zeros(sw.shape, dtype=acc, device=sw.device) if grad and need_w else None
    gb = torch.zeros(sw.shape[0], dtype=acc, device=sw.device) if grad and need_b else None
    # One pair of logit buffers for all chunks: fresh chunk-sized tensors would each fault in new pages
    # (allocations this large are mmapped afresh every time).
    s_buf = torch.empty(min(chunk, n), vocab, dtype=sh.dtype, device=sh.device)
    t_buf = torch.empty(min(chunk, n), vocab, dtype=th.dtype, device=th.device)
    s_cap, t_cap = caps
    # the capped student logits, kept for the cap's derivative 1 - (capped / cap)^2 once the kernel has
    # written the gradient over them
    cap_buf = torch.empty_like(s_buf) if s_cap is not None and grad else None
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        hs = sh[c0:c1]
        s_logits = _linear_into(s_buf[:c1 - c0], hs, sw[:vocab], None if sb is None else sb[:vocab])
        t_logits = _linear_into(t_buf[:c1 - c0], th[c0:c1], tw[:vocab], None if tb is None else tb[:vocab])
        if s_cap is not None:
            _softcap_(s_logits, s_cap)
            if cap_buf is not None:
                capped = cap_buf[:c1 - c0].copy_(s_logits)
        if t_cap is not None:
            _softcap_(t_logits, t_cap)
        w = None if row_w is None else row_w[c0:c1]  # the kernel scales each row's gradient by its weight
        try:
            if grad:  # the gradient overwrites the chunk's logits: no new buffer
                loss = torch.ops.sdft_kernels.distill_dense_inplace_(s_logits, t_logits, valid[c0:c1], w, div,
                                                                     beta, tau)
                g = s_logits
            else:
                loss, _ = torch.ops.sdft_kernels.distill_dense(s_logits, t_logits, valid[c0:c1], w, div, beta,
                                                               tau, False)
        except RuntimeError as e:  # RowError::raise (csrc/cpu/distill_common.h) names a row of this chunk
            m = re.match(r"(student|teacher)_logits: row (\d+) (.*)", str(e).splitlines()[0])
            if not m:
                raise
            side, r, what = m.group(1), c0 + int(m.group(2)), m.group(3)
            raise ValueError(f"{side}_hidden / {side}_weight: the logits of token row {r} {what}") from None
        rows[c0:c1] = loss
        del s_logits, t_logits
        if not grad:
            continue
        if cap_buf is not None:  # chain rule through the cap: g *= 1 - (capped / cap)^2
            g.mul_(capped.div_(s_cap).square_().neg_().add_(1.0))
        if gh is not None:
            torch.matmul(g, sw[:vocab], out=gh[c0:c1])
        if gw is not None:
            if g.dtype == acc:
                gw[:vocab].addmm_(g.t(), hs)
            else:  # bf16/fp16 into the fp32 buffer
                _add_product_fp32_(gw[:vocab], g.t(), hs)
        if gb is not None:
            gb[:vocab].add_(g.sum(0, dtype=acc))
    # The CUDA kernel marks a bad row by a NaN loss instead of raising (the CPU one raised above).
    report_bad_rows(rows, "student_hidden / student_weight or teacher_hidden / teacher_weight: the logits of token")
    return rows, gh, gw, gb


class _FusedLinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, valid, row_w, opts):
        div, beta, tau, vocab, chunk, per_row, caps = opts
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], sb is not None and ctx.needs_input_grad[2])
        any_grad = any(want)
        ctx.opts, ctx.want, ctx.used, ctx.unit = opts, want, False, None
        ctx.dtypes = (sh.dtype, sw.dtype, None if sb is None else sb.dtype)
        if per_row or not any_grad:  # reduction="none": gradients are computed in backward
            rows, *_ = _chunks(sh, sw, sb, th, tw, tb, valid, None, div, beta, tau, vocab, chunk, want, caps)
            ctx.save_for_backward(sh, sw, sb, th, tw, tb, valid)
            return rows if per_row else (rows * row_w).sum()
        kernel_w, ctx.unit = kernel_row_weights(row_w, sh.dtype)  # float16: backward multiplies ctx.unit in
        rows, gh, gw, gb = _chunks(sh, sw, sb, th, tw, tb, valid, kernel_w, div, beta, tau, vocab, chunk, want,
                                   caps)
        ctx.save_for_backward(gh, gw, gb)
        return (rows * row_w).sum()

    @staticmethod
    def backward(ctx, grad_out):
        div, beta, tau, vocab, chunk, per_row, caps = ctx.opts
        check_once_differentiable(grad_out, "fused_linear_distill_loss")  # before any work (and its errors)
        if per_row:  # recompute the chunks with the incoming per-token gradient as row weights
            sh, sw, sb, th, tw, tb, valid = ctx.saved_tensors
            row_w = grad_out.reshape(-1).to(torch.float64 if sh.dtype == torch.float64 else torch.float32)
            _, gh, gw, gb = _chunks(sh, sw, sb, th, tw, tb, valid, row_w, div, beta, tau, vocab, chunk, ctx.want,
                                    caps)
            scale = None
        else:
            gh, gw, gb = ctx.saved_tensors
            scale = grad_out if ctx.unit is None else grad_out * ctx.unit
        # Eager, not float64: the accumulated buffers (ours alone) are scaled in place, or returned as they
        # are for loss.backward()'s incoming 1 (read on CPU only, where it costs no sync): a fresh copy of
        # the V x H weight gradient took 50 ms at V=32000, H=512 on CPU. As for distill_loss, a second
        # backward through the same loss is then refused (the buffers may have become .grad tensors).
        in_place = scale is not None and ctx.dtypes[0] != torch.float64 and not traced(grad_out)
        if in_place:
            check_not_reused(ctx)
            ctx.used = True
            if scale.device.type == "cpu" and float(scale) == 1.0:
                scale = None
        out = []
        for t, dtype in zip((gh, gw, gb), ctx.dtypes):
            if t is not None:
                if scale is not None:
                    t = t.mul_(scale) if in_place else t * scale
                t = t.to(dtype)
            out.append(t)
        return out[0], out[1], out[2], None, None, None, None, None, None


def fused_linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                              teacher_bias=None, vocab_alignment=None, chunk_size=None, divergence="forward_kl",
                              beta=0.5, temperature=1.0, scale_by_t2=False, labels=None, ignore_index=-100,
                              mask=None, reduction="mean", student_softcap=None, teacher_softcap=None):
    """distill_loss(student_hidden @ student_weight.T + student_bias, teacher_hidden @ teacher_weight.T +
    teacher_bias, ...) without ever holding the N x V logits.

    student_hidden [..., Hs], student_weight [V, Hs], teacher_hidden [..., Ht], teacher_weight [V', Ht]
    (Ht may differ from Hs), biases [V] / [V'] or None; all floating, student and teacher each in one
    dtype, on one device. V != V' raises unless vocab_alignment="shared_prefix": both vocabularies are
    then cut to their first min(V, V') entries (the student's extra rows of student_weight get no
    gradient). chunk_size: tokens per chunk (default: as many as fit DEFAULT_CHUNK_BYTES of student and
    teacher logits, CUDA_CHUNK_BYTES on CUDA; the gradient overwrites the student's). Gradients flow to
    student_hidden, student_weight and student_bias (weight and bias gradients accumulate in float32);
    the teacher gets none. student_softcap / teacher_softcap: a positive float c soft-caps that model's
    logits as c * tanh(logits / c) before the divergence (Gemma 2's final_logit_softcapping; the
    gradient includes the cap's derivative; one more chunk-sized buffer). Other options as in distill_loss.
    """
    names = (("student_hidden", student_hidden), ("student_weight", student_weight),
             ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight))
    for name, t in names + (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if t is None and "bias" in name:
            continue
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor")
        if t.device != student_hidden.device:
            raise ValueError(f"{name}: expected a tensor on {student_hidden.device}, got one on {t.device}")
        check_reverse_mode_only(name, t)
    for name, t in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        if t.dim() < 1 or t.shape[-1] < 1:
            raise ValueError(f"{name}: expected shape [..., H] with H >= 1, got {tuple(t.shape)}")
    if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student_weight: expected shape [V, {student_hidden.shape[-1]}] (student_hidden is "
                         f"{tuple(student_hidden.shape)}), got {tuple(student_weight.shape)}")
    if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(f"teacher_weight: expected shape [V', {teacher_hidden.shape[-1]}] (teacher_hidden is "
                         f"{tuple(teacher_hidden.shape)}), got {tuple(teacher_weight.shape)}")
    if tuple(teacher_hidden.shape[:-1]) != tuple(student_hidden.shape[:-1]):
        raise ValueError(f"teacher_hidden: expected leading shape {tuple(student_hidden.shape[:-1])} like "
                         f"student_hidden, got {tuple(teacher_hidden.shape)}")
    if student_weight.dtype != student_hidden.dtype:
        raise TypeError(f"student_weight: expected dtype {student_hidden.dtype} like student_hidden, "
                        f"got {student_weight.dtype}")
    if teacher_hidden.dtype != student_hidden.dtype or teacher_weight.dtype != student_hidden.dtype:
        raise TypeError(f"teacher_hidden/teacher_weight: expected dtype {student_hidden.dtype} like "
                        f"student_hidden, got {teacher_hidden.dtype}/{teacher_weight.dtype}")
    v_s, v_t = student_weight.shape[0], teacher_weight.shape[0]
    for name, v in (("student_weight", v_s), ("teacher_weight", v_t)):
        if v < 1:
            raise ValueError(f"{name}: expected at least one vocabulary row, got shape [{v}, ...]")
    for name, b, v in (("student_bias", student_bias, v_s), ("teacher_bias", teacher_bias, v_t)):
        if b is not None and (tuple(b.shape) != (v,) or b.dtype != student_hidden.dtype):
            raise ValueError(f"{name}: expected shape ({v},) and dtype {student_hidden.dtype}, "
                             f"got {tuple(b.shape)} {b.dtype}")
    if vocab_alignment not in (None, "shared_prefix"):
        raise ValueError(f"vocab_alignment: expected None or 'shared_prefix', got {vocab_alignment!r}")
    if v_s != v_t and vocab_alignment is None:
        raise ValueError(f"teacher_weight: vocabulary size {v_t} differs from student_weight's {v_s}; pass "
                         f"vocab_alignment='shared_prefix' to compare the first min(V, V') entries")
    check_options(divergence, beta, temperature, reduction)
    for name, c in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        if c is not None and (not _real(c) or not 0 < c < float("inf")):  # as temperature is checked
            raise ValueError(f"{name}: expected None or a positive finite float, got {c!r}")
    caps = (None if student_softcap is None else float(student_softcap),
            None if teacher_softcap is None else float(teacher_softcap))
    vocab = min(v_s, v_t)
    lead = tuple(student_hidden.shape[:-1])
    # labels are the student's tokens: in range of its vocabulary, also where only a shared prefix is compared
    valid = valid_rows(lead, v_s, student_hidden.device, labels, ignore_index, mask)
    sh = student_hidden.reshape(-1, student_hidden.shape[-1])
    th = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    n = sh.shape[0]
    chunk = _chunk_rows(n, vocab, sh.element_size(), chunk_size, sh.device.type)
    acc = torch.float64 if sh.dtype == torch.float64 else torch.float32
    # Row weights of the scalar reductions (their gradient is folded into the kernel's output).
    batch = student_hidden.shape[0] if student_hidden.dim() > 1 else 1
    row_w = row_weights(valid, "sum" if reduction == "none" else reduction, batch, temperature, scale_by_t2, acc)
    per_row = reduction == "none"
    opts = (DIVERGENCES[divergence], float(beta), float(temperature), vocab, chunk, per_row, caps)
    out = _FusedLinearDistill.apply(sh, student_weight, student_bias, th, teacher_weight.detach(),
                                    None if teacher_bias is None else teacher_bias.detach(), valid, row_w, opts)
    if per_row:
        out = out.reshape(lead)
        if scale_by_t2:
            out = out * (temperature * temperature)
    return out
