"""The shipped narrow task: sorting a short list of single digits, in a fixed instruction / response
template. Synthetic (no download), endless, and checkable: the answer is extracted from the generated
text and compared exactly. Digits are written space-separated so that every digit is its own token
for byte-level BPE tokenizers (" 7"), which makes the task learnable by a tiny model in a few hundred
steps while being far from general text (fine-tuning on it causes forgetting).

    ### Instruction:
    Sort these numbers in ascending order: 7 3 9 1

    ### Response:
    The answer is 1 3 7 9.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

INSTRUCTION = "Sort these numbers in ascending order:"
# whole numbers: with single digits, "The answer is 0 1 2 34" read as "0 1 2 3", a correct answer
_ANSWER_RE = re.compile(r"The answer is\s*([0-9]+(?:[ \t]+[0-9]+)*)")


@dataclass(frozen=True)
class Example:
    numbers: tuple[int, ...]

    @property
    def instruction(self) -> str:
        return f"{INSTRUCTION} {' '.join(map(str, self.numbers))}"

    @property
    def answer(self) -> str:
        return " ".join(map(str, sorted(self.numbers)))

    def to_dict(self) -> dict:
        return {"numbers": list(self.numbers), "instruction": self.instruction, "answer": self.answer}


def make_examples(n: int, seed: int = 0, *, min_len: int = 4, max_len: int = 6) -> list[Example]:
    """n examples, deterministic in seed: lists of min_len..max_len digits 0-9 (repeats allowed)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if not (isinstance(min_len, int) and isinstance(max_len, int) and 2 <= min_len <= max_len):
        raise ValueError(f"min_len/max_len: expected 2 <= min_len <= max_len, got {min_len!r}, {max_len!r}")
    rng = random.Random(seed)
    return [Example(tuple(rng.randrange(10) for _ in range(rng.randint(min_len, max_len)))) for _ in range(n)]


def format_prompt(example: Example) -> str:
    return f"### Instruction:\n{example.instruction}\n\n### Response:\n"


def format_response(example: Example) -> str:
    return f"The answer is {example.answer}."


def format_example(example: Example) -> str:
    return format_prompt(example) + format_response(example)


def extract_answer(text: str) -> str | None:
    """The first "The answer is d d d" in text, normalised to single spaces; None if absent."""
    m = _ANSWER_RE.search(text)
    return " ".join(m.group(1).split()) if m else None


def is_correct(example: Example, text: str) -> bool:
    return extract_answer(text) == example.answer


def encode_example(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + EOS). The prompt gets the tokenizer's usual special tokens (BOS if
    it uses one), the response none; EOS teaches the model to stop."""
    p = tokenizer(format_prompt(example))["input_ids"]
    r = tokenizer(format_response(example), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    return list(p), list(r)


def _pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def sft_batch(tokenizer, examples: list[Example]):
    """Right-padded (input_ids, attention_mask, labels) LongTensors; labels are -100 except on the
    response tokens, so the loss covers the response only."""
    if not examples:
        raise ValueError("examples: empty")
    enc = [encode_example(tokenizer, ex) for ex in examples]
    T = max(len(p) + len(r) for p, r in enc)
    pad = _pad_id(tokenizer)
    ids = torch.full((len(enc), T), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), T), dtype=torch.long)
    labels = torch.full((len(enc), T), -100, dtype=torch.long)
    for i, (p, r) in enumerate(enc):
        seq = p + r
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, len(p):len(seq)] = torch.tensor(r)
    return ids, mask, labels


def check_fits(model, prompt_tokens: int, max_new_tokens: int = 24) -> None:
    """Refuse a model whose context cannot hold a prompt and its continuation (generation would fail
    with an index error inside the model)."""
    from .models import context_length
    ctx = context_length(model)
    if ctx is not None and prompt_tokens + max_new_tokens > ctx:
        raise ValueError(f"model: its context of {ctx} tokens cannot hold a prompt of {prompt_tokens} tokens and "
                         f"{max_new_tokens} new ones; the narrow task needs a longer context (sdft eval: "
                         "--task-examples 0 skips it)")


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 24,
                    batch_size: int = 32) -> list[str]:
    """Greedy continuations of `prompts` (batched, left-padded), decoded without special tokens."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    dev = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    was_training = model.training
    model.eval()
    out_texts = []
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    check_fits(model, max((len(e) for e in encoded), default=0), max_new_tokens)
    try:
        for b in range(0, len(prompts), batch_size):
            enc = encoded[b:b + batch_size]
            T = max(len(e) for e in enc)
            ids = torch.full((len(enc), T), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, e in enumerate(enc):
                ids[i, T - len(e):] = torch.tensor(e)
                mask[i, T - len(e):] = 1
            gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id, num_beams=1)
            out_texts += tokenizer.batch_decode(gen[:, T:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out_texts


def generate_responses(model, tokenizer, examples: list[Example], max_new_tokens: int = 24,
                       batch_size: int = 32) -> list[str]:
    """Greedy continuations of each example's prompt."""
    return generate_greedy(model, tokenizer, [format_prompt(ex) for ex in examples], max_new_tokens, batch_size)


def task_accuracy(model, tokenizer, examples: list[Example], max_new_tokens: int = 24,
                  batch_size: int = 32) -> float:
    """Fraction of examples whose greedy response contains the exact sorted list as its answer."""
    if not examples:
        raise ValueError("examples: empty, accuracy is undefined")
    texts = generate_responses(model, tokenizer, examples, max_new_tokens, batch_size)
    return sum(is_correct(ex, t) for ex, t in zip(examples, texts)) / len(examples)


@torch.no_grad()
def task_loss(model, tokenizer, examples: list[Example], batch_size: int = 32) -> float:
    """Mean cross-entropy over response tokens (teacher forcing)."""
    if not examples:
        raise ValueError("examples: empty")
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b in range(0, len(examples), batch_size):
            ids, mask, labels = sft_batch(tokenizer, examples[b:b + batch_size])
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
            lab = labels[:, 1:].to(dev)
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), lab, ignore_index=-100,
                                                   reduction="sum")
            total += float(ce)
            count += int((lab != -100).sum())
    finally:
        model.train(was_training)
    return total / count
