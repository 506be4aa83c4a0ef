"""nn.Module form of the fused distillation losses, for training loops (Hugging Face or plain PyTorch).

Plug-in for a Hugging Face causal LM step, without forking model code:

    loss_fn = DistillationLoss(divergence="forward_kl", temperature=2.0)
    with torch.no_grad():
        t_out = teacher(input_ids, attention_mask=attn)
    s_out = student(input_ids, attention_mask=attn)
    loss = loss_fn(s_out.logits, t_out.logits, mask=attn.bool())

or, never materialising the N x V logits, from the last hidden states and the lm_heads:

    s_h = student.model(input_ids, attention_mask=attn).last_hidden_state      # base model only
    with torch.no_grad():
        t_h = teacher.model(input_ids, attention_mask=attn).last_hidden_state
    loss = loss_fn.from_hidden(s_h, student.get_output_embeddings(), t_h,
                               teacher.get_output_embeddings(), mask=attn.bool())
"""
from __future__ import annotations

import torch
from torch import nn

from .ops.distill import check_options, distill_loss
from .ops.fused_linear import fused_linear_distill_loss

__all__ = ["DistillationLoss", "chunked_cross_entropy"]


class DistillationLoss(nn.Module):
    """Distillation loss module; options as in sdft_kernels.distill_loss.

    shift_labels=True applies the causal-LM shift (logits at position t are scored against labels at
    t + 1, as Hugging Face models do): the last position's logits and the first label are dropped.
    """

    def __init__(self, divergence="forward_kl", beta=0.5, temperature=1.0, scale_by_t2=False,
                 ignore_index=-100, reduction="mean", shift_labels=False, vocab_alignment=None, chunk_size=None):
        super().__init__()
        check_options(divergence, beta, temperature, reduction)
        self.divergence, self.beta, self.temperature = divergence, float(beta), float(temperature)
        self.scale_by_t2, self.ignore_index, self.reduction = scale_by_t2, ignore_index, reduction
        self.shift_labels, self.vocab_alignment, self.chunk_size = shift_labels, vocab_alignment, chunk_size

    def _options(self):
        return dict(divergence=self.divergence, beta=self.beta, temperature=self.temperature,
                    scale_by_t2=self.scale_by_t2, ignore_index=self.ignore_index, reduction=self.reduction)

    def _shift(self, s, t, labels, mask):
        if not self.shift_labels:
            return s, t, labels, mask
        s, t = s[..., :-1, :], t[..., :-1, :]
        labels = None if labels is None else labels[..., 1:]
        mask = None if mask is None else mask[..., 1:]
        return s, t, labels, mask

    def forward(self, student_logits, teacher_logits, labels=None, mask=None):
        """student_logits, teacher_logits: [..., V]; labels / mask: [...] (see distill_loss)."""
        s, t, labels, mask = self._shift(student_logits, teacher_logits, labels, mask)
        return distill_loss(s, t, labels=labels, mask=mask, **self._options())

    def from_hidden(self, student_hidden, student_head, teacher_hidden, teacher_head, labels=None, mask=None,
                    student_softcap=None, teacher_softcap=None):
        """Fused-linear form: *_hidden [..., H] are the final hidden states, *_head an nn.Linear
        (the model's lm_head, e.g. model.get_output_embeddings()), a weight tensor [V, H] or a
        (weight, bias) pair. For a model that scales its logits (Cohere, Granite) pass
        sdft_kernels.heads.head_params(model), which folds the scale in; *_softcap: a model's final-logit
        soft-cap (sdft_kernels.heads.softcap(model), Gemma 2), see fused_linear_distill_loss."""
        sw, sb = _weight_bias("student_head", student_head)
        tw, tb = _weight_bias("teacher_head", teacher_head)
        s, t, labels, mask = self._shift(student_hidden, teacher_hidden, labels, mask)
        return fused_linear_distill_loss(s, sw, t, tw, student_bias=sb, teacher_bias=tb,
                                         vocab_alignment=self.vocab_alignment, chunk_size=self.chunk_size,
                                         labels=labels, mask=mask, student_softcap=student_softcap,
                                         teacher_softcap=teacher_softcap, **self._options())

    def extra_repr(self):
        opts = {**self._options(), "shift_labels": self.shift_labels, "vocab_alignment": self.vocab_alignment,
                "chunk_size": self.chunk_size}
        return ", ".join(f"{k}={v!r}" for k, v in opts.items())


def _weight_bias(name, head):
    """(weight, bias) from a head given as a weight tensor, a (weight, bias) pair (heads.head_params) or
    a linear module (a QuantLinear's fake-quantised weight; LoRA adapters on it are refused: the fused
    loss reads the weight and would ignore them)."""
    if isinstance(head, torch.Tensor):
        return head, None
    if isinstance(head, tuple) and len(head) == 2 and isinstance(head[0], torch.Tensor):
        return head
    if isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), torch.Tensor):
        from .heads import linear_params
        return linear_params(head, name)
    raise TypeError(f"{name}: expected an nn.Linear-like module (with .weight [V, H]), a weight tensor or a "
                    "(weight, bias) pair")


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, *,
                          ignore_index: int = -100, chunk_size: int | None = None,
                          logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """Summed cross-entropy of head(hidden) [N, V] against targets [N], a chunk of tokens at a time.

    Each chunk's logits are recomputed in backward (activation checkpointing), so at most one chunk of
    logits exists at any time, in forward or backward: the memory of the full N x V logits (and their
    float32 copy and gradient) is never needed. hidden [N, d]; head: any module mapping [C, d] -> [C, V]
    (an lm_head, a QuantLinear, a LoRA-wrapped Linear); chunk_size: tokens per chunk, default from the same
    256 MiB budget as fused_linear_distill_loss; logit_scale: the factor the model applies to its head's
    output (heads.logit_scale), softcap: its final-logit soft-cap (heads.softcap). Costs one extra head
    matmul per chunk in backward."""
    from torch.utils.checkpoint import checkpoint

    from .ops.fused_linear import _chunk_rows

    if hidden.dim() != 2 or targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets: expected shape [{hidden.shape[0]}] for hidden of shape "
                         f"{list(hidden.shape)} ([N, d]), got {list(targets.shape)}")
    vocab = head.weight.shape[0] if hasattr(head, "weight") else None
    chunk = _chunk_rows(hidden.shape[0], vocab or 1, 4, chunk_size)

    def piece(h, t):
        logits = head(h).float()
        if logit_scale != 1.0:
            logits = logits * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return nn.functional.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for c0 in range(0, hidden.shape[0], chunk):
        h, t = hidden[c0:c0 + chunk], targets[c0:c0 + chunk]
        total = total + (checkpoint(piece, h, t, use_reentrant=False) if torch.is_grad_enabled() else piece(h, t))
    return total
