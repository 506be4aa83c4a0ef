"""Evaluation: sliding-window token-level perplexity, recovery ratio, and the correlation between
alignment and recovery across runs.

Perplexity definition. The token sequence x_0 .. x_{N-1} is cut into windows of `window` tokens that
start every `stride` tokens (0, stride, 2*stride, ...; the last window ends at N). In each window the
model scores only the tokens no earlier window scored, so every token is scored exactly once and each
has at least window - stride tokens of context (except near the start). x_0 has no context and is never
scored; with stride == window the windows do not overlap and each window's first token is not scored
(the usual non-overlapping evaluation). ppl = exp(sum of token NLL / number of scored tokens), with the
sum accumulated in float64.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .checks import ids_in_vocab, int_at_least


def _windows(n_tokens: int, window: int, stride: int):
    """(begin, end, first scored position) for each window; scored positions are [first, end)."""
    out, prev_end, begin = [], 1, 0
    while True:
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end >= n_tokens:
            return out
        begin += stride


@torch.no_grad()
def token_nll(model, token_ids_1d: torch.Tensor, window: int | None = None, stride: int | None = None,
              batch_size: int = 8) -> tuple[float, int]:
    """(sum of negative log-likelihoods in nats, number of scored tokens) under the sliding window."""
    if not isinstance(token_ids_1d, torch.Tensor):
        raise TypeError(f"token_ids_1d: expected a 1-D LongTensor, got {type(token_ids_1d).__name__}")
    if token_ids_1d.dim() != 1 or token_ids_1d.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_ids_1d: expected a 1-D integer tensor, got shape {tuple(token_ids_1d.shape)} "
                         f"dtype {token_ids_1d.dtype}")
    n = token_ids_1d.numel()
    if n < 2:
        raise ValueError(f"token_ids_1d: need at least 2 tokens to score one, got {n}")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if getattr(emb, "num_embeddings", None) is not None:
        ids_in_vocab(token_ids_1d, emb.num_embeddings, "token_ids_1d")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if window is None:
        window = min(n, max_pos or 1024, 1024)
    window = int_at_least(window, "window", 1)
    if window < 2:
        raise ValueError(f"window: expected >= 2 (one context token and one scored token), got {window}")
    if max_pos is not None and window > max_pos:
        raise ValueError(f"window: {window} exceeds the model's max_position_embeddings={max_pos}")
    if stride is None:
        stride = max(1, window // 2)
    stride = int_at_least(stride, "stride", 1)
    if stride > window:
        raise ValueError(f"stride: expected <= window ({window}) so no token is skipped, got {stride}")
    batch_size = int_at_least(batch_size, "batch_size", 1)

    dev = next(model.parameters()).device
    ids = token_ids_1d.long()
    wins = _windows(n, window, stride)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        # Windows of equal length are batched together (all but possibly the last have length `window`).
        groups: dict[int, list] = {}
        for w in wins:
            groups.setdefault(w[1] - w[0], []).append(w)
        for length, ws in groups.items():
            for b in range(0, len(ws), batch_size):
                chunk = ws[b:b + batch_size]
                x = torch.stack([ids[s:e] for s, e, _ in chunk]).to(dev)
                logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
                if not bool(torch.isfinite(logits).all()):
                    raise FloatingPointError("perplexity: the model produced NaN/Inf logits")
                nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").double()
                # target at absolute position p sits at column p - begin - 1
                cols = torch.arange(1, length, device=dev)
                keep = torch.stack([cols + s >= f for s, _, f in chunk])
                total += float(nll[keep].sum())
                count += int(keep.sum())
    finally:
        model.train(was_training)
    return total, count


def perplexity(model, token_ids_1d: torch.Tensor, window: int | None = None, stride: int | None = None,
               batch_size: int = 8) -> float:
    """Token-level perplexity of a 1-D token sequence with a sliding window (see the module docstring).
    Defaults: window = min(len, max_position_embeddings, 1024), stride = window // 2."""
    total, count = token_nll(model, token_ids_1d, window, stride, batch_size)
    return math.exp(total / count)


def perplexity_of_text(model, tokenizer, text: str, window: int | None = None, stride: int | None = None,
                       batch_size: int = 8) -> float:
    """Perplexity of a text (tokenised without special tokens)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text: expected a non-empty string")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return perplexity(model, ids, window, stride, batch_size)


def recovery_ratio(original: float, degraded: float, recovered: float, *, log: bool = False,
                   rtol: float = 1e-9) -> float:
    """(recovered - degraded) / (original - degraded): the fraction of the degradation's loss that the
    recovery won back, for any metric whatever its direction (perplexity or accuracy alike).
    1 = fully recovered, 0 = no better than the degraded model, < 0 = worse than degraded, > 1 = better
    than the original. log=True applies the formula to log values (for perplexity: to the mean token
    NLL), which needs positive inputs. When the degradation changed nothing (|original - degraded| <=
    rtol * max(|original|, |degraded|, 1)) the ratio is undefined and NaN is returned."""
    vals = {"original": original, "degraded": degraded, "recovered": recovered}
    for k, v in vals.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise TypeError(f"{k}: expected a number, got {type(v).__name__}")
        if not math.isfinite(float(v)):
            raise ValueError(f"{k}: expected a finite number, got {v!r}")
        if log and float(v) <= 0:
            raise ValueError(f"{k}: log=True needs a positive value, got {v!r}")
    o, d, r = (math.log(float(v)) if log else float(v) for v in (original, degraded, recovered))
    if abs(o - d) <= rtol * max(abs(o), abs(d), 1.0):
        return float("nan")
    return (r - d) / (o - d)


def correlate(x, y) -> dict:
    """Pearson and Spearman correlation (with two-sided p-values, scipy.stats) between paired values.
    Returns {"pearson_r", "pearson_p", "spearman_r", "spearman_p", "n"}; NaN correlations when one
    side is constant."""
    from scipy import stats

    xa = np.asarray(x, dtype=np.float64).ravel()
    ya = np.asarray(y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise ValueError(f"x, y: expected the same number of values, got {xa.size} and {ya.size}")
    if xa.size < 3:
        raise ValueError(f"x, y: need at least 3 pairs for a correlation with a p-value, got n={xa.size}")
    for name, a in (("x", xa), ("y", ya)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: contains NaN/Inf at positions {np.flatnonzero(~np.isfinite(a)).tolist()}")
    out = {"n": int(xa.size)}
    if np.ptp(xa) == 0 or np.ptp(ya) == 0:  # scipy warns and returns NaN; say so without the warning
        out.update(pearson_r=float("nan"), pearson_p=float("nan"), spearman_r=float("nan"), spearman_p=float("nan"))
        return out
    pr = stats.pearsonr(xa, ya)
    sr = stats.spearmanr(xa, ya)
    sp = _spearman_exact_p(xa, ya, float(sr.statistic)) if xa.size <= _EXACT_SPEARMAN_N else float(sr.pvalue)
    out.update(pearson_r=float(pr.statistic), pearson_p=float(pr.pvalue),
               spearman_r=float(sr.statistic), spearman_p=sp)
    return out


_EXACT_SPEARMAN_N = 9  # 9! = 362880 orderings


def _spearman_exact_p(x, y, rho) -> float:
    """Two-sided permutation p-value of Spearman's rho over all n! orderings of y. scipy's t approximation
    gives p = 0 for a perfect rank correlation at any n, where the exact value at n = 3 is 1/3."""
    import itertools
    from scipy.stats import rankdata
    rx, ry = rankdata(x) - (x.size + 1) / 2, rankdata(y) - (y.size + 1) / 2
    perms = np.array(list(itertools.permutations(range(x.size))))
    r = ry[perms] @ rx / np.sqrt((rx @ rx) * (ry @ ry))
    return float(np.mean(np.abs(r) >= abs(rho) - 1e-12))
