"""A Hugging Face `Trainer` whose loss is the fused distillation divergence to a frozen teacher, so SDFT
(or any logit distillation) runs in a standard HF training script and neither model's N x V logits
exist: both models run with `logits_to_keep=1`, and the divergence is computed from their final hidden
states and lm_heads by fused_linear_distill_loss, a chunk of tokens at a time.

    from sdft_kernels import DistillationLoss
    from sdft_kernels.trainer import DistillationTrainer
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                                  train_dataset=ds, data_collator=collator,
                                  loss=DistillationLoss(divergence="forward_kl", temperature=1.0))
    trainer.train()

Batches hold input_ids, and optionally attention_mask (padding) and labels (-100 marks tokens left out,
e.g. prompts). Position t is distilled when token t + 1 is a real, labelled token (the causal shift,
as for the next-token loss); with ce_weight > 0 the next-token cross-entropy on the labels (or on the
input ids) is added, also a chunk at a time, as its mean over predicted tokens. With the default
reduction the loss of a batch is the mean over its distilled tokens; with gradient accumulation the
Trainer averages the micro-batches' losses.

The student's forward goes through the model passed in (so DDP and peft wrappers see it); FSDP is
refused (its weights are gathered only inside forward, and the fused loss uses the lm_head's weight
after it): use `sdft recover --strategy fsdp` for sharded training.
"""
from __future__ import annotations

import copy

import torch
from transformers import Trainer

from .heads import _hf, check_head, head_params, logit_scale, softcap
from .losses import DistillationLoss, chunked_cross_entropy

__all__ = ["DistillationTrainer"]


def final_hidden(model, input_ids, attention_mask=None):
    """The final hidden states [B, T, H] the lm_head reads, from a forward that computes the logits of
    the last position only."""
    kw = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    try:
        out = model(**kw, logits_to_keep=1)
    except TypeError:  # an architecture (or older transformers) without logits_to_keep: same states, full logits
        out = model(**kw)
    return out.hidden_states[-1]


class DistillationTrainer(Trainer):
    """Trainer with the fused distillation loss to `teacher_model` (frozen, moved to the training device).

    loss: a DistillationLoss (default forward KL, T = 1); its shift_labels is forced on (the causal
    shift above). ce_weight: weight of the added next-token cross-entropy (0: pure distillation)."""

    def __init__(self, *args, teacher_model, loss: DistillationLoss | None = None, ce_weight: float = 0.0,
                 **kwargs):
        if loss is not None and not isinstance(loss, DistillationLoss):
            raise TypeError(f"loss: expected a sdft_kernels.DistillationLoss, got {type(loss).__name__}")
        if isinstance(ce_weight, bool) or not isinstance(ce_weight, (int, float)) or not ce_weight >= 0:
            raise ValueError(f"ce_weight: expected a float >= 0, got {ce_weight!r}")
        if not hasattr(teacher_model, "get_output_embeddings") or teacher_model.get_output_embeddings() is None:
            raise TypeError("teacher_model: expected a Hugging Face causal LM (with an output head)")
        super().__init__(*args, **kwargs)
        if getattr(self, "is_fsdp_enabled", False):
            raise ValueError("DistillationTrainer: FSDP is not supported (the fused loss reads the lm_head "
                             "weight outside forward); use DDP, or `sdft recover --strategy fsdp`")
        s_vocab = _hf(self.model).get_output_embeddings().weight.shape[0]
        t_vocab = teacher_model.get_output_embeddings().weight.shape[0]
        if s_vocab != t_vocab and (loss is None or loss.vocab_alignment is None):
            raise ValueError(f"teacher_model: vocabulary {t_vocab} differs from the student's {s_vocab}; pass "
                             "loss=DistillationLoss(vocab_alignment=...) to say how they align")
        self.teacher = teacher_model.to(self.args.device).eval().requires_grad_(False)
        self.distill = copy.copy(loss) if loss is not None else DistillationLoss()
        self.distill.shift_labels = True  # on a copy: the caller's module is left as it was
        self.ce_weight = float(ce_weight)
        # compute_loss returns a mean over the micro-batch's tokens: the Trainer must divide by the
        # gradient-accumulation steps itself (not expect a loss normalised by num_items_in_batch)
        self.model_accepts_loss_kwargs = False
        self._checked = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        attn, labels = inputs.get("attention_mask"), inputs.get("labels")
        if not self._checked:  # logits = final hidden @ head (scaled, quantised) for both, or refused
            check_head(model, final_hidden, ids, "model")
            check_head(self.teacher, final_hidden, ids, "teacher_model")
            self._checked = True
        mask = attn.bool() if attn is not None else None
        s_h = final_hidden(model, ids, attn)
        with torch.no_grad():
            t_h = final_hidden(self.teacher, ids, attn)
        s_head, t_head = head_params(model, "model"), head_params(self.teacher, "teacher_model")
        # under an autocast (TrainingArguments(bf16=True)) the states may come back in bf16 while the heads
        # stay float32: compute the logits in the heads' precision
        s_h, t_h = s_h.to(s_head[0].dtype), t_h.to(t_head[0].dtype)
        loss = self.distill.from_hidden(s_h, s_head, t_h, t_head, labels=labels, mask=mask,
                                        student_softcap=softcap(model), teacher_softcap=softcap(self.teacher))
        if self.ce_weight > 0:
            target = (labels if labels is not None else ids)[:, 1:]
            if labels is None and mask is not None:
                target = target.masked_fill(~mask[:, 1:], -100)
            n = (target != -100).sum().clamp_min(1)
            ce = chunked_cross_entropy(s_h[:, :-1].reshape(-1, s_h.shape[-1]), _hf(model).get_output_embeddings(),
                                       target.reshape(-1), logit_scale=logit_scale(model, "model"),
                                       softcap=softcap(model))
            loss = loss + self.ce_weight * ce / n
        return (loss, None) if return_outputs else loss
