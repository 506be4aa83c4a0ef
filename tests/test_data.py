"""Shipped text splits, token_blocks and the n-gram baselines of sdft_kernels.data."""
import re

import numpy as np
import pytest
import torch

from sdft_kernels import data
from sdft_kernels.models import load_default_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_default_tokenizer()


def _modules(text):
    return set(re.findall(r"^# ---- file: (\S+) ----$", text, flags=re.M))


def test_splits_load_and_are_disjoint_by_module():
    texts = {s: data.load_text(s) for s in data.SPLITS}
    for s, t in texts.items():
        assert len(t) > 50_000, s
    total = sum(len(t.encode()) for t in texts.values())
    assert total < 3_200_000  # the package ships at most ~3 MB of text
    mods = {s: _modules(t) for s, t in texts.items()}
    assert "argparse.py" in mods["heldout"] and "statistics.py" in mods["calibration"]
    assert not mods["heldout"] & mods["train"]
    assert not mods["calibration"] & mods["train"]
    assert not mods["heldout"] & mods["calibration"]


def test_load_text_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        data.load_text("test")


def test_token_blocks_shapes_and_stride(tok):
    text = data.load_text("heldout")[:20_000]
    ids = data.encode(tok, text)
    blocks = data.token_blocks(tok, text, 64)
    assert blocks.dtype == torch.long and blocks.shape == (ids.numel() // 64, 64)
    assert torch.equal(blocks.reshape(-1), ids[: blocks.numel()])  # non-overlapping, in order
    strided = data.token_blocks(tok, text, 64, stride=16, max_blocks=10)
    assert strided.shape == (10, 64)
    for i in range(10):
        assert torch.equal(strided[i], ids[16 * i: 16 * i + 64])
    # overlapping blocks share exactly the stride offset
    assert torch.equal(strided[1, :48], strided[0, 16:])
    n_all = data.token_blocks(tok, text, 64, stride=100).shape[0]
    assert n_all == (ids.numel() - 64) // 100 + 1
    one = data.token_blocks(tok, text, ids.numel())
    assert one.shape == (1, ids.numel())


def test_token_blocks_errors(tok):
    with pytest.raises(ValueError, match="empty"):
        data.token_blocks(tok, "", 8)
    with pytest.raises(TypeError, match="text"):
        data.token_blocks(tok, b"bytes", 8)
    with pytest.raises(ValueError, match="fewer than block_len"):
        data.token_blocks(tok, "def f(x): return x", 512)
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="block_len"):
            data.token_blocks(tok, "def f(x): return x", bad)
    with pytest.raises(ValueError, match="stride"):
        data.token_blocks(tok, "def f(x): return x", 2, stride=0)
    with pytest.raises(ValueError, match="max_blocks"):
        data.token_blocks(tok, "def f(x): return x", 2, max_blocks=0)


def _kn_reference(train, ev, V, d=0.75):
    """Direct (loop) interpolated Kneser-Ney bigram, to check the vectorised baseline."""
    from collections import Counter
    pairs = Counter(zip(train[:-1], train[1:]))
    c_prev = Counter(train[:-1])
    after = Counter(v for v, _ in pairs)
    before = Counter(w for _, w in pairs)
    nll = 0.0
    for v, w in zip(ev[:-1], ev[1:]):
        pc = (before[w] + 1) / (len(pairs) + V)
        if c_prev[v]:
            p = max(pairs[(v, w)] - d, 0) / c_prev[v] + d * after[v] / c_prev[v] * pc
        else:
            p = pc
        nll -= np.log(p)
    return float(np.exp(nll / (len(ev) - 1)))


def test_ngram_baselines_match_loop_reference_and_normalise():
    rng = np.random.default_rng(0)
    V = 7
    train = list(rng.integers(0, V - 1, 400))  # token V-1 never seen in training
    ev = list(rng.integers(0, V, 60))
    out = data.ngram_baselines(train, ev, V)
    assert out["bigram_kn"] == pytest.approx(_kn_reference(train, ev, V), rel=1e-10)
    assert out["eval_tokens"] == 59
    # KN bigram is a distribution for every context: summing over all next tokens gives 1
    for v in range(V):
        probs = [1.0 / data.ngram_baselines(train, [v, w], V)["bigram_kn"] for w in range(V)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-12)


def test_ngram_baselines_learn_structure_and_reject_bad_ids():
    seq = [0, 1, 2, 3] * 200
    out = data.ngram_baselines(seq, seq[:50], 10)
    assert out["bigram_kn"] < 1.5 < out["unigram_add1"]
    with pytest.raises(ValueError, match="vocab_size"):
        data.ngram_baselines([0, 1, 12], [0, 1], 10)
    with pytest.raises(ValueError, match="at least 2"):
        data.ngram_baselines([0], [0, 1], 10)


def test_ngram_baselines_2d_rows_score_each_row_separately():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 9, 300)
    rows = rng.integers(0, 9, (3, 20))
    both = data.ngram_baselines(train, rows, 9)
    assert both["eval_tokens"] == 3 * 19
    for key in ("unigram_add1", "bigram_add1", "bigram_kn"):
        per_row = [np.log(data.ngram_baselines(train, r, 9)[key]) for r in rows]
        assert np.log(both[key]) == pytest.approx(np.mean(per_row), rel=1e-12)
    with pytest.raises(ValueError, match="eval_ids"):
        data.ngram_baselines(train, rows[None], 9)
