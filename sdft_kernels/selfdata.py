"""Self-data distillation (Yang et al. 2024, "Self-Distillation Bridges Distribution Gap in Language
Model Fine-Tuning"; used for pruned-model recovery by Thangarasa et al. 2024, arXiv 2410.09982).

The teacher is shown each task example's instruction together with its reference response and asked
to answer in its own words. An answer-consistency filter keeps a rewrite only when the answer
extracted from it equals the reference answer; otherwise the original response is kept. The student
is then fine-tuned (cross-entropy on the response tokens) on the resulting data, which is closer to
the teacher's own output distribution than the original responses, so fine-tuning shifts the model
less (less forgetting / better recovery).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import tasks

REWRITE_TEMPLATE = ("### Instruction:\n{instruction}\n\n"
                    "### Reference answer:\n{reference}\n\n"
                    "Write your own response to the instruction; it must reach the same answer.\n\n"
                    "### Response:\n")


def rewrite_prompt(example) -> str:
    return REWRITE_TEMPLATE.format(instruction=example.instruction, reference=tasks.format_response(example))


def consistency_filter(examples, rewrites: list[str]) -> tuple[list[str], list[bool]]:
    """Per example: the rewrite if its extracted answer equals the reference answer, else the original
    response. Returns (responses, kept flags)."""
    if len(examples) != len(rewrites):
        raise ValueError(f"rewrites: expected one per example ({len(examples)}), got {len(rewrites)}")
    responses, kept = [], []
    for ex, text in zip(examples, rewrites):
        text = text.strip().split("\n\n", 1)[0].strip()  # one paragraph: the model's response
        ok = bool(text) and tasks.extract_answer(text) == ex.answer
        responses.append(text if ok else tasks.format_response(ex))
        kept.append(ok)
    return responses, kept


def self_distill(teacher, tokenizer, examples, *, max_new_tokens: int = 32, batch_size: int = 32):
    """Rewrite each example's response with the teacher and filter for answer consistency.

    Returns (responses, stats) with stats = {"total", "kept", "kept_fraction"}."""
    if not examples:
        raise ValueError("examples: empty")
    prompts = [rewrite_prompt(ex) for ex in examples]
    rewrites = tasks.generate_greedy(teacher, tokenizer, prompts, max_new_tokens, batch_size)
    responses, kept = consistency_filter(examples, rewrites)
    n = sum(kept)
    return responses, {"total": len(examples), "kept": n, "kept_fraction": n / len(examples)}


@dataclass
class SFTConfig:
    steps: int = 50
    batch_size: int = 16
    lr: float = 3e-4
    seed: int = 0


def _batch(tokenizer, examples, responses):
    eos = tokenizer.eos_token_id
    seqs, starts = [], []
    for ex, r in zip(examples, responses):
        p = tokenizer(tasks.format_prompt(ex))["input_ids"]
        a = tokenizer(r, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        seqs.append(p + a)
        starts.append(len(p))
    T = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        labels[i, st:len(s)] = torch.tensor(s[st:])
    return ids, attn, labels


def finetune(student, tokenizer, examples, responses, cfg: SFTConfig | None = None) -> list[float]:
    """Fine-tune `student` in place on (prompt, response) pairs, loss on the response tokens only.
    Quantized / pruned students keep their structure (their own forward is trained). Returns losses."""
    cfg = cfg or SFTConfig()
    if len(examples) != len(responses) or not examples:
        raise ValueError("responses: expected one response per example, and at least one example")
    if cfg.steps < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise ValueError(f"SFTConfig: steps, batch_size must be >= 1 and lr > 0, got {cfg}")
    student.requires_grad_(True)
    student.train()
    dev = next(student.parameters()).device
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr)
    rng = random.Random(cfg.seed)
    order, losses = [], []
    for _ in range(cfg.steps):
        while len(order) < cfg.batch_size:  # (an `if` left batches short with fewer examples than batch_size)
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        ids, attn, labels = _batch(tokenizer, [examples[i] for i in idx], [responses[i] for i in idx])
        logits = student(input_ids=ids.to(dev), attention_mask=attn.to(dev)).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1).to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    student.eval()
    return losses
