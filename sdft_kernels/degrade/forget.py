"""Catastrophic forgetting: supervised fine-tuning on the shipped narrow task (tasks.py), with the loss
on response tokens only. Deterministic in `seed` (data order and any dropout), independent of the
global RNG state."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from .. import tasks
from .common import identity_map, model_device, record


def _pos_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")


def forget_sft(model, tokenizer, steps: int, lr: float = 3e-4, batch_size: int = 16, seed: int = 0, *,
               n_examples: int = 4096, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
               eval_ids: torch.Tensor | None = None, eval_window: int | None = None, log_every: int = 1,
               task_eval_examples: int = 64, progress: bool = False):
    """Fine-tune a copy of `model` on the narrow task for `steps` AdamW steps (constant lr, batches drawn
    from a fixed pool of n_examples task examples). Returns (model in eval mode, record).

    Record: "loss_curve" ([step, loss] every log_every steps), "task_loss_before/after" (response CE on
    task_eval_examples held-out task examples), and with eval_ids (1-D general text tokens) "perplexity_before/after"
    so the loss of general capability is measured on the spot. progress=True shows a tqdm bar."""
    _pos_int("steps", steps)
    _pos_int("batch_size", batch_size)
    _pos_int("n_examples", n_examples)
    _pos_int("log_every", log_every)
    _pos_int("task_eval_examples", task_eval_examples)
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: expected a positive finite float, got {lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm: expected a positive float or None, got {max_grad_norm!r}")
    if eval_ids is not None and (not isinstance(eval_ids, torch.Tensor) or eval_ids.dim() != 1 or eval_ids.numel() < 2):
        raise ValueError("eval_ids: expected a 1-D LongTensor of at least 2 tokens")
    from ..evaluate import perplexity

    new = copy.deepcopy(model)
    for p_ in new.parameters():  # a frozen input (e.g. a teacher) is still fine-tuned as a copy
        p_.requires_grad_(True)
    dev = model_device(new)
    train = tasks.make_examples(n_examples, seed=seed)
    held = tasks.make_examples(task_eval_examples, seed=seed + 1_000_003)  # a different stream: not the training pool
    rec_extra = {"task_loss_before": tasks.task_loss(new, tokenizer, held)}
    if eval_ids is not None:
        rec_extra["perplexity_before"] = perplexity(new, eval_ids, window=eval_window)

    gen = torch.Generator().manual_seed(seed)
    params = [p for p in new.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    curve = []
    new.train()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)  # dropout, if the model has any
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc="forget_sft", unit="step")
        for step in range(1, steps + 1):
            idx = torch.randint(len(train), (batch_size,), generator=gen).tolist()
            ids, mask, labels = tasks.sft_batch(tokenizer, [train[i] for i in idx])
            ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
            logits = new(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"forget_sft: loss became {float(loss)} at step {step}; lower lr ({lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            if step % log_every == 0 or step == steps:
                curve.append([step, float(loss.detach())])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if bar is not None:
            bar.close()
    new.eval()
    rec_extra["task_loss_after"] = tasks.task_loss(new, tokenizer, held)
    if eval_ids is not None:
        rec_extra["perplexity_after"] = perplexity(new, eval_ids, window=eval_window)
    p = {"steps": steps, "lr": float(lr), "batch_size": batch_size, "seed": seed, "n_examples": n_examples,
         "weight_decay": float(weight_decay), "max_grad_norm": max_grad_norm, "task": "sort-digits"}
    return new, record("forget_sft", p, identity_map(new), loss_curve=curve, final_loss=curve[-1][1], **rec_extra)
