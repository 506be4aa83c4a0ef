"""Shipped text and token blocks for the embedded default model.

The text is CPython standard-library source (PSF licence), split by module by
python/default_model_data.py: "heldout" and "calibration" come from modules the default model never saw
during training; "train" is a ~1.5 MB sample of the training modules (SDFT recovery data). See
sdft_kernels/assets/data/README.md for the module lists and licence.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "heldout", "calibration")


def data_dir() -> Path:
    """Directory of the shipped text files (package data)."""
    return Path(__file__).resolve().parent / "assets" / "data"


def load_text(split: str) -> str:
    """The shipped text of one split: "train", "heldout" or "calibration"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = data_dir() / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"shipped text for split {split!r} not found at {path}; rebuild it with "
                                "python python/train_default_model.py (or reinstall the package)")
    return path.read_text(encoding="utf-8")


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def encode(tokenizer, text: str) -> torch.Tensor:
    """1-D LongTensor of the token ids of `text` (no special tokens added)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text:
        raise ValueError("text is empty: nothing to tokenize")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast path; also avoids the model_max_length warning on long texts
        ids = backend.encode(text, add_special_tokens=False).ids
    elif hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    return torch.tensor(ids, dtype=torch.long)


def token_blocks(tokenizer, text: str, block_len: int, max_blocks: int | None = None,
                 stride: int | None = None) -> torch.Tensor:
    """Cut the tokenized `text` into blocks: LongTensor [n, block_len].

    Block i starts at token i * stride (default stride = block_len, i.e. non-overlapping); a tail shorter
    than block_len is dropped; at most `max_blocks` blocks are returned.
    """
    _check_positive_int("block_len", block_len)
    _check_positive_int("max_blocks", max_blocks, allow_none=True)
    _check_positive_int("stride", stride, allow_none=True)
    ids = encode(tokenizer, text)
    if ids.numel() < block_len:
        raise ValueError(f"text has only {ids.numel()} tokens, fewer than block_len={block_len}")
    stride = block_len if stride is None else stride
    n = (ids.numel() - block_len) // stride + 1
    if max_blocks is not None:
        n = min(n, max_blocks)
    return ids.unfold(0, block_len, stride)[:n].contiguous()


def ngram_baselines(train_ids, eval_ids, vocab_size: int, discount: float = 0.75) -> dict:
    """Perplexities of count-based baselines fit on `train_ids`, scored on eval_ids[1:].

    The same tokens a causal LM predicts on eval_ids (every token but the first; with a 2-D eval_ids
    [n, L], every token but the first of each row) are scored, so the numbers compare directly with the
    model's token-level perplexity. Returns "unigram_add1",
    "bigram_add1" and "bigram_kn" (interpolated Kneser-Ney bigram with an add-one continuation
    distribution so no probability is zero).
    """
    t = np.asarray(train_ids, dtype=np.int64).ravel()
    e = np.asarray(eval_ids, dtype=np.int64)
    if e.ndim not in (1, 2):
        raise ValueError(f"eval_ids must be 1-D or 2-D [n, L], got shape {e.shape}")
    e2 = e.reshape(1, -1) if e.ndim == 1 else e
    if t.size < 2 or e2.shape[1] < 2:
        raise ValueError(f"need at least 2 train and 2 eval tokens per row, got {t.size} and {e2.shape[1]}")
    if min(t.min(), e.min()) < 0 or max(t.max(), e.max()) >= vocab_size:
        raise ValueError(f"token ids must lie in [0, vocab_size={vocab_size})")
    V = vocab_size
    uni = np.bincount(t, minlength=V).astype(np.float64)
    keys, counts = np.unique(t[:-1] * V + t[1:], return_counts=True)
    prev, nxt = keys // V, keys % V
    c_prev = np.bincount(prev, weights=counts, minlength=V)        # c(v, .)
    types_after = np.bincount(prev, minlength=V).astype(np.float64)  # N1+(v, .)
    types_before = np.bincount(nxt, minlength=V).astype(np.float64)  # N1+(., w)
    p_cont = (types_before + 1.0) / (keys.size + V)

    v, w = e2[:, :-1].ravel(), e2[:, 1:].ravel()
    q = v * V + w
    pos = np.minimum(np.searchsorted(keys, q), keys.size - 1)
    c_vw = np.where(keys[pos] == q, counts[pos], 0).astype(np.float64)
    cv = c_prev[v]
    seen = cv > 0
    safe = np.where(seen, cv, 1.0)
    p_kn = np.where(seen, np.maximum(c_vw - discount, 0.0) / safe
                    + discount * types_after[v] / safe * p_cont[w], p_cont[w])
    p_add1 = (c_vw + 1.0) / (cv + V)
    p_uni = (uni[w] + 1.0) / (t.size + V)

    def ppl(p):
        return float(np.exp(-np.mean(np.log(p))))

    return {"unigram_add1": ppl(p_uni), "bigram_add1": ppl(p_add1), "bigram_kn": ppl(p_kn),
            "eval_tokens": int(w.size), "train_tokens": int(t.size)}
