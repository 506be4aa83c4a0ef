"""Evaluation: sliding-window perplexity against direct cross-entropy, recovery ratio, correlation
against scipy."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from transformers import LlamaConfig, LlamaForCausalLM

from sdft_kernels.evaluate import _windows, correlate, perplexity, perplexity_of_text, recovery_ratio, token_nll

VOCAB = 89


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (203,), generator=torch.Generator().manual_seed(3))


def direct_nll(model, ids, window):
    """Non-overlapping chunks, each scored independently with the usual shift (float64 sums)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, ids.numel(), window):
            x = ids[s:s + window]
            if x.numel() < 2:
                continue
            logits = model(x.unsqueeze(0)).logits[0, :-1].double()
            total += float(F.cross_entropy(logits, x[1:], reduction="sum"))
            count += x.numel() - 1
    return total, count


@pytest.mark.parametrize("window", [16, 50, 64])
def test_stride_equal_window_is_exp_mean_ce(model, ids, window):
    total, count = direct_nll(model, ids, window)
    ppl = perplexity(model, ids, window=window, stride=window, batch_size=3)
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert token_nll(model, ids, window, window)[1] == count


def test_sliding_window_scores_each_token_once_with_enough_context(model, ids):
    window, stride = 32, 8
    wins = _windows(ids.numel(), window, stride)
    scored = [p for _, e, f in wins for p in range(f, e)]
    assert scored == list(range(1, ids.numel()))  # every token but the first, exactly once
    assert all(f - b >= window - stride or b == 0 for b, _, f in wins)
    # Direct computation: each token scored by its own window's logits.
    total = 0.0
    with torch.no_grad():
        for b, e, f in wins:
            logits = model(ids[b:e].unsqueeze(0)).logits[0].double()
            for p in range(f, e):
                total -= float(torch.log_softmax(logits[p - b - 1], -1)[ids[p]])
    ppl = perplexity(model, ids, window=window, stride=stride, batch_size=4)
    assert ppl == pytest.approx(math.exp(total / (ids.numel() - 1)), rel=1e-5)
    # more context never hurts this much: overlapping and non-overlapping agree roughly
    assert abs(math.log(ppl) - math.log(perplexity(model, ids, window=window, stride=window))) < 0.5


def test_perplexity_of_text_and_training_mode_restored(model):
    class Tok:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) % VOCAB for c in text]}

    text = "the quick brown fox jumps over the lazy dog " * 3
    ref = perplexity(model, torch.tensor([ord(c) % VOCAB for c in text]), window=32, stride=16)
    model.train()
    assert perplexity_of_text(model, Tok(), text, window=32, stride=16) == pytest.approx(ref)
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="text"):
        perplexity_of_text(model, Tok(), "   ")


def test_perplexity_bad_arguments(model, ids):
    for kw, arg in (({"window": 1}, "window"), ({"window": 0}, "window"), ({"window": 65}, "window"),
                    ({"window": 16, "stride": 17}, "stride"), ({"window": 16, "stride": 0}, "stride")):
        with pytest.raises(ValueError, match=arg):
            perplexity(model, ids, **kw)
    with pytest.raises(ValueError, match="token_ids_1d"):
        perplexity(model, ids[:1])
    with pytest.raises(ValueError, match="token_ids_1d"):
        perplexity(model, ids.view(7, 29))
    with pytest.raises(TypeError, match="token_ids_1d"):
        perplexity(model, ids.tolist())


def test_recovery_ratio():
    # perplexity (lower is better) and accuracy (higher is better) use the same formula
    assert recovery_ratio(10.0, 20.0, 12.0) == pytest.approx(0.8)
    assert recovery_ratio(0.9, 0.5, 0.8) == pytest.approx(0.75)
    assert recovery_ratio(10.0, 20.0, 25.0) == pytest.approx(-0.5)
    assert recovery_ratio(10.0, 20.0, 9.0) == pytest.approx(1.1)
    assert recovery_ratio(10.0, 40.0, 20.0, log=True) == pytest.approx(0.5)  # on mean NLL
    with pytest.raises(ValueError, match="degraded"):
        recovery_ratio(1.0, 0.0, 0.5, log=True)
    assert math.isnan(recovery_ratio(10.0, 10.0, 12.0))  # nothing was lost: undefined
    assert math.isnan(recovery_ratio(10.0, 10.0 + 1e-12, 12.0))
    with pytest.raises(ValueError, match="recovered"):
        recovery_ratio(1.0, 2.0, float("nan"))
    with pytest.raises(TypeError, match="original"):
        recovery_ratio("1", 2.0, 1.5)


def test_correlate_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    y = 0.7 * x + rng.normal(scale=0.5, size=12)
    out = correlate(list(x), torch.tensor(y))
    pr, sr = stats.pearsonr(x, y), stats.spearmanr(x, y)
    assert out["n"] == 12
    assert out["pearson_r"] == pytest.approx(pr.statistic) and out["pearson_p"] == pytest.approx(pr.pvalue)
    assert out["spearman_r"] == pytest.approx(sr.statistic) and out["spearman_p"] == pytest.approx(sr.pvalue)
    # known values: a perfect monotone, non-linear relation
    out = correlate([1, 2, 3, 4], [1, 4, 9, 16])
    assert out["spearman_r"] == pytest.approx(1.0) and out["spearman_p"] == pytest.approx(1 / 12)  # exact, n = 4
    assert 0.98 < out["pearson_r"] < 1.0
    assert math.isnan(correlate([1, 1, 1], [1, 2, 3])["pearson_r"])


def test_correlate_bad_input():
    with pytest.raises(ValueError, match="n=2"):
        correlate([1, 2], [3, 4])
    with pytest.raises(ValueError, match="same number"):
        correlate([1, 2, 3], [3, 4])
    with pytest.raises(ValueError, match="y"):
        correlate([1, 2, 3], [3, float("nan"), 4])


def test_spearman_p_is_exact_for_few_pairs():
    # scipy's t approximation says p = 0 for a perfect rank correlation at any n; the permutation
    # distribution over all n! orderings gives 2/3! at n = 3 and 2/4! at n = 4 (both directions count)
    from sdft_kernels.evaluate import correlate
    assert correlate([1, 2, 3], [10, 20, 30])["spearman_p"] == pytest.approx(1 / 3)
    assert correlate([1, 2, 3, 4], [4, 3, 2, 1])["spearman_p"] == pytest.approx(1 / 12)
    x = [0.1, 0.4, 0.2, 0.9, 0.5, 0.3]
    y = [1.0, 2.0, 3.0, 4.0, 6.0, 5.0]
    import itertools
    rho = stats.spearmanr(x, y).statistic  # brute force with scipy's statistic over all 720 orderings
    perm = [abs(stats.spearmanr(x, p).statistic) >= abs(rho) - 1e-12 for p in itertools.permutations(y)]
    assert correlate(x, y)["spearman_p"] == pytest.approx(np.mean(perm), abs=1e-12)


def test_token_ids_out_of_the_vocabulary_name_the_argument():
    from sdft_kernels.models import tiny_random_model
    model, _ = tiny_random_model(num_layers=1, hidden_size=16, seed=0)
    v = model.config.vocab_size
    for bad in (torch.tensor([1, 2, v]), torch.tensor([1, -1, 2])):  # was the embedding's bare IndexError
        with pytest.raises(ValueError, match="token_ids_1d: expected ids in"):
            perplexity(model, bad)
    ids = torch.randint(0, v, (20,), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, ids, window=np.int64(8)) == perplexity(model, ids, window=8)  # NumPy ints accepted
