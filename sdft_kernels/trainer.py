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
input ids) is added, also a chunk at a time, as its mean over the same tokens. With the default
reduction ("mean") the loss of an optimizer step is the mean over all its distilled tokens, weighted by
token, not by micro-batch: under gradient accumulation (and DDP with average_tokens_across_devices)
each micro-batch's summed loss is divided by the step's total token count, which the Trainer gathers
before the step (`_get_num_items_in_batch`, overridden here to count the distilled positions). So
micro-batches of unequal valid-token counts give the gradient of one batch holding them all. Other
reductions, and DataParallel over several GPUs in one process, keep the Trainer's plain averaging.

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
        # Token-weighted accumulation (module docstring): compute_loss returns sum / (the step's token count)
        # whenever the Trainer passes that count, and the Trainer then does not divide by the accumulation
        # steps. Its flag for this is model_accepts_loss_kwargs; transformers without the counting hook keep
        # the plain per-micro-batch mean.
        self.token_weighted = self.distill.reduction == "mean" and hasattr(Trainer, "_get_num_items_in_batch")
        self.model_accepts_loss_kwargs = self.token_weighted
        self._summed = copy.copy(self.distill)
        self._summed.reduction = "sum"
        self._checked = False

    def _get_num_items_in_batch(self, batch_samples, device):
        """Distilled positions in the micro-batches of one optimizer step (summed over ranks when the
        Trainer averages tokens across devices); None where the loss is not token-weighted."""
        if not self.token_weighted or self.args.n_gpu > 1 or not batch_samples:
            return None
        n = sum(int(scored(b, self.distill.ignore_index).sum()) for b in batch_samples)
        n = torch.tensor(n, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            n = self.accelerator.gather(n).sum()
        return n

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
        keep = scored(inputs, self.distill.ignore_index)
        # mean: the summed loss over this micro-batch's tokens, divided below by the step's token count
        dl = self._summed if self.distill.reduction == "mean" else self.distill
        loss = dl.from_hidden(s_h, s_head, t_h, t_head, labels=labels, mask=mask,
                              student_softcap=softcap(model), teacher_softcap=softcap(self.teacher))
        if self.ce_weight > 0:  # next-token CE on the distilled positions, summed
            ig = self.distill.ignore_index
            target = (labels if labels is not None else ids)[:, 1:].masked_fill(~keep, ig)
            ce = chunked_cross_entropy(s_h[:, :-1].reshape(-1, s_h.shape[-1]), _hf(model).get_output_embeddings(),
                                       target.reshape(-1), ignore_index=ig, logit_scale=logit_scale(model, "model"),
                                       softcap=softcap(model))
            if self.distill.reduction != "mean":
                ce = ce / keep.sum().clamp_min(1)
            loss = loss + self.ce_weight * ce
        if self.distill.reduction == "mean":
            if self.token_weighted and num_items_in_batch is not None:
                # the step's token count over every rank: DDP averages the ranks' gradients, so scale back up
                scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
                loss = loss * scale / torch.as_tensor(num_items_in_batch, device=loss.device).clamp_min(1)
            else:
                loss = loss / keep.sum().clamp_min(1)
        return (loss, None) if return_outputs else loss


def scored(inputs, ignore_index=-100):
    """[B, T-1] bool: the positions t that are distilled (and scored by the added CE), those whose next
    token t + 1 is a real (attention_mask) and labelled (labels != ignore_index) token."""
    ids = inputs["input_ids"]
    keep = torch.ones_like(ids[:, 1:], dtype=torch.bool)
    if inputs.get("labels") is not None:
        keep &= inputs["labels"][:, 1:] != ignore_index
    if inputs.get("attention_mask") is not None:
        keep &= inputs["attention_mask"][:, 1:].bool()
    return keep
