"""Pure-PyTorch references for the distillation losses (imported by tests AND benchmarks).

Everything here is written the obvious way (full log-softmax of both sides, pointwise terms, a plain
reduction) so that it is easy to check by eye. It runs in any dtype: in float64 it is the numerical
reference the kernels are tested against; in the input dtype it is the "naive PyTorch" baseline (and,
wrapped in torch.compile, the compiled baseline) that the benchmarks compare with.

Conventions (shared with sdft_kernels.distill_loss):
  s = student_logits / T, u = teacher_logits / T, q = softmax(s) (student), p = softmax(u) (teacher).
  forward_kl: KL(p || q) = sum p (log p - log q)
  reverse_kl: KL(q || p) = sum q (log q - log p)
  jsd:        m = beta p + (1 - beta) q;  beta KL(p || m) + (1 - beta) KL(q || m)   (TRL GKD convention)
              beta == 0 -> KL(p || q) and beta == 1 -> KL(q || p), as TRL does (the mixture formula
              itself is identically 0 at both ends).
  Terms with zero probability contribute 0 (0 log 0 = 0). Rows whose label is ignore_index or whose
  mask is False contribute 0. reduction: "none" -> per-token [...]; "sum"; "mean" -> sum / #valid
  tokens (0 when none is valid); "batchmean" -> sum / logits.shape[0]. scale_by_t2 multiplies by T^2.
"""
from __future__ import annotations

import math

import torch

__all__ = ["divergence_rows", "distill_loss_ref", "topk_divergence_rows", "distill_loss_topk_ref",
           "fused_linear_distill_loss_ref", "reduce_rows", "valid_rows"]


def _xlogy_diff(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a * (log_a - log_b) with the convention 0 * anything = 0."""
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))


def _mixture_log(p_log: torch.Tensor, q_log: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta p + (1 - beta) q) from log p and log q, computed stably."""
    return torch.logaddexp(p_log + math.log(beta), q_log + math.log1p(-beta))


def divergence_from_logprobs(p_log: torch.Tensor, q_log: torch.Tensor, divergence: str,
                             beta: float) -> torch.Tensor:
    """Per-row divergence between teacher log-probs p_log and student log-probs q_log (last dim)."""
    p, q = p_log.exp(), q_log.exp()
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _xlogy_diff(p, p_log, q_log).sum(-1)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _xlogy_diff(q, q_log, p_log).sum(-1)
    if divergence == "jsd":
        m_log = _mixture_log(p_log, q_log, beta)
        return (beta * _xlogy_diff(p, p_log, m_log) + (1.0 - beta) * _xlogy_diff(q, q_log, m_log)).sum(-1)
    raise ValueError(f"divergence: expected 'forward_kl', 'reverse_kl' or 'jsd', got {divergence!r}")


def divergence_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                    divergence: str = "forward_kl", beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-token divergence [...] between teacher and student logits [..., V], in their dtype."""
    q_log = torch.log_softmax(student_logits / temperature, dim=-1)
    p_log = torch.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    return divergence_from_logprobs(p_log, q_log, divergence, beta)


def valid_rows(shape, device, labels=None, ignore_index: int = -100, mask=None) -> torch.Tensor:
    """Boolean [...] of tokens that count: label != ignore_index and mask True."""
    valid = torch.ones(shape, dtype=torch.bool, device=device)
    if labels is not None:
        valid = valid & (labels != ignore_index)
    if mask is not None:
        valid = valid & mask.bool()
    return valid


def reduce_rows(rows: torch.Tensor, valid: torch.Tensor, reduction: str, batch: int) -> torch.Tensor:
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / valid.sum().clamp_min(1).to(rows.dtype)
    if reduction == "batchmean":
        return rows.sum() / max(batch, 1)
    raise ValueError(f"reduction: expected 'none', 'sum', 'mean' or 'batchmean', got {reduction!r}")


def distill_loss_ref(student_logits, teacher_logits, *, divergence="forward_kl", beta=0.5,
                     temperature=1.0, scale_by_t2=False, labels=None, ignore_index=-100, mask=None,
                     reduction="mean"):
    """Dense reference / naive baseline with the same signature as sdft_kernels.distill_loss."""
    rows = divergence_rows(student_logits, teacher_logits, divergence=divergence, beta=beta,
                           temperature=temperature)
    valid = valid_rows(rows.shape, rows.device, labels, ignore_index, mask)
    out = reduce_rows(rows, valid, reduction, student_logits.shape[0] if student_logits.dim() > 1 else 1)
    return out * (temperature * temperature) if scale_by_t2 else out


def topk_divergence_rows(student_logits, teacher_topk_logprobs, teacher_topk_indices, *,
                         divergence="forward_kl", beta=0.5, temperature=1.0) -> torch.Tensor:
    """Per-token divergence between k+1 buckets: the teacher's top-k entries (log-probs taken as
    given, not re-tempered) plus one tail bucket holding its missing mass 1 - sum(exp(topk)), and the
    student's probabilities (softmax(student_logits / T)) at the same k indices plus its mass outside
    them. When the k indices cover the whole vocabulary the tail bucket is dropped (k == V is the
    dense loss)."""
    q_log_full = torch.log_softmax(student_logits / temperature, dim=-1)
    idx = teacher_topk_indices.long()
    q_log_k = q_log_full.gather(-1, idx)
    p_log_k = teacher_topk_logprobs.detach().to(q_log_full.dtype)
    V, k = student_logits.shape[-1], idx.shape[-1]
    if k == V:
        return divergence_from_logprobs(p_log_k, q_log_k, divergence, beta)
    # Student tail: logsumexp over the entries NOT selected (exact, no 1 - sum cancellation).
    selected = torch.zeros_like(q_log_full, dtype=torch.bool).scatter_(-1, idx, True)
    q_log_tail = torch.logsumexp(q_log_full.masked_fill(selected, float("-inf")), dim=-1, keepdim=True)
    p_tail = (1.0 - p_log_k.exp().sum(-1, keepdim=True)).clamp_min(0.0)
    p_log_tail = torch.log(p_tail)  # -inf when the teacher's top-k already hold all its mass
    p_log = torch.cat([p_log_k, p_log_tail], dim=-1)
    q_log = torch.cat([q_log_k, q_log_tail], dim=-1)
    return divergence_from_logprobs(p_log, q_log, divergence, beta)


def distill_loss_topk_ref(student_logits, teacher_topk_logprobs, teacher_topk_indices, *,
                          divergence="forward_kl", beta=0.5, temperature=1.0, scale_by_t2=False,
                          labels=None, ignore_index=-100, mask=None, reduction="mean"):
    rows = topk_divergence_rows(student_logits, teacher_topk_logprobs, teacher_topk_indices,
                                divergence=divergence, beta=beta, temperature=temperature)
    valid = valid_rows(rows.shape, rows.device, labels, ignore_index, mask)
    out = reduce_rows(rows, valid, reduction, student_logits.shape[0] if student_logits.dim() > 1 else 1)
    return out * (temperature * temperature) if scale_by_t2 else out


def fused_linear_distill_loss_ref(student_hidden, student_weight, teacher_hidden, teacher_weight, *,
                                  student_bias=None, teacher_bias=None, vocab_alignment=None,
                                  chunk_size=None, **options):
    """Naive fused-linear baseline: materialise both full N x V logits, then the dense reference."""
    del chunk_size  # the naive version has no chunks
    s = student_hidden @ student_weight.t()
    if student_bias is not None:
        s = s + student_bias
    with torch.no_grad():
        t = teacher_hidden @ teacher_weight.t()
        if teacher_bias is not None:
            t = t + teacher_bias
    if vocab_alignment == "shared_prefix":
        v = min(s.shape[-1], t.shape[-1])
        s, t = s[..., :v], t[..., :v]
    return distill_loss_ref(s, t, **options)
