"""Pruning: the removed blocks are the argmin of a brute-force angular distance, the pruned model equals
the original with those blocks skipped and still generates with a KV cache; unstructured and 2:4
sparsity are exactly achieved, pick the lowest scores, and survive an optimizer step."""
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sdft_kernels.degrade.prune import prune_2_4, prune_blocks, prune_unstructured

VOCAB = 101


def small_llama(layers=6, hidden=64, inter=96, seed=0):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return small_llama()


@pytest.fixture(scope="module")
def calib():
    return torch.randint(1, VOCAB, (6, 24), generator=torch.Generator().manual_seed(1))


def brute_force_distances(model, seqs, n):
    """Angular distance per start block, one unpadded sequence at a time, float64 NumPy-style loop.
    h_l = input of block l (output_hidden_states[l] for l < L); h_L = output of the last block, taken
    from the final norm's input."""
    L = model.config.num_hidden_layers
    per_seq = []
    for s in seqs:
        captured = {}
        h = model.model.norm.register_forward_pre_hook(lambda m, a: captured.setdefault("last", a[0]))
        with torch.no_grad():
            out = model(s.unsqueeze(0), output_hidden_states=True)
        h.remove()
        states = [out.hidden_states[i][0, -1].double() for i in range(L)] + [captured["last"][0, -1].double()]
        d = []
        for start in range(L - n + 1):
            a, b = states[start], states[start + n]
            cos = float(a @ b) / (float(a.norm()) * float(b.norm()))
            d.append(math.acos(max(-1.0, min(1.0, cos))) / math.pi)
        per_seq.append(d)
    return torch.tensor(per_seq).mean(0)


@pytest.mark.parametrize("n", [1, 3])
def test_prune_blocks_matches_brute_force_and_skips_blocks(model, calib, n):
    pruned, rec = prune_blocks(model, n, calib)
    ref = brute_force_distances(model, list(calib), n)
    torch.testing.assert_close(torch.tensor(rec["distances"]), ref, rtol=1e-6, atol=1e-9)
    start = int(ref.argmin())
    assert rec["removed"] == list(range(start, start + n))
    keep = [i for i in range(6) if i not in rec["removed"]]
    assert rec["layer_map"] == keep and rec["kind"] == "prune_blocks" and rec["params"]["n"] == n
    json.dumps(rec, allow_nan=False)
    assert pruned.config.num_hidden_layers == 6 - n == len(pruned.model.layers)
    assert [lay.self_attn.layer_idx for lay in pruned.model.layers] == list(range(6 - n))
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6  # input untouched
    assert len(rec["distances_all"]) == 5 and rec["distances_all"][str(n)] == rec["distances"]
    # The pruned model == the original with the removed blocks replaced by the identity.
    def skip(mod, args, kwargs, out):
        return args[0] if args else kwargs["hidden_states"]

    hooks = [model.model.layers[i].register_forward_hook(skip, with_kwargs=True) for i in rec["removed"]]
    try:
        with torch.no_grad():
            expect = model(calib).logits
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        torch.testing.assert_close(pruned(calib).logits, expect, rtol=1e-5, atol=1e-5)
    # generation with the KV cache (renumbered layer_idx) == generation without it
    prompt = calib[:2, :6]
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(pruned.generate(prompt, use_cache=True, **kw),
                               pruned.generate(prompt, use_cache=False, **kw))


def test_prune_blocks_last_non_pad_token(model, calib):
    """Right-padded calibration: the distance uses each sequence's last real token."""
    lengths = [24, 17, 9, 20, 13, 24]
    ids = calib.clone()
    mask = torch.zeros_like(ids)
    for i, ln in enumerate(lengths):
        mask[i, :ln] = 1
        ids[i, ln:] = 0
    _, rec = prune_blocks(model, 2, ids, attention_mask=mask)
    ref = brute_force_distances(model, [calib[i, :ln] for i, ln in enumerate(lengths)], 2)
    torch.testing.assert_close(torch.tensor(rec["distances"]), ref, rtol=1e-5, atol=1e-7)


def test_prune_blocks_bad_arguments(model, calib):
    for n in (0, -1, 6, 7, True, 1.0):
        with pytest.raises(ValueError, match="n"):
            prune_blocks(model, n, calib)
    for bad in (None, torch.zeros(0, 5, dtype=torch.long), torch.zeros(3, 0, dtype=torch.long)):
        with pytest.raises((ValueError, TypeError), match="calib_ids"):
            prune_blocks(model, 1, bad)


def masked_weights(model):
    return {n: m.weight for n, m in model.named_modules() if hasattr(m, "weight_mask")}


def train_one_step(model, ids):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.eval()


def wanda_layer0_norms(model, calib):
    """||X_j||_2 of the inputs of block 0's linears in the unpruned model (block 0 sees no pruning)."""
    sq, hooks = {}, []
    for n, m in model.model.layers[0].named_modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(lambda mod, i, o, n=n: sq.__setitem__(
                n, sq.get(n, 0) + i[0].reshape(-1, i[0].shape[-1]).double().pow(2).sum(0))))
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    return {f"model.layers.0.{n}": v.sqrt() for n, v in sq.items()}


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_exact_sparsity_lowest_scores_and_kept_after_step(model, calib, method):
    sp = 0.37
    pruned, rec = prune_unstructured(model, sp, method=method, calib_ids=calib)
    orig = dict(model.named_modules())
    norms = wanda_layer0_norms(model, calib) if method == "wanda" else {}
    ws = masked_weights(pruned)
    assert len(ws) == 6 * 7
    total = zeros = 0
    for name, w in ws.items():
        w0 = orig[name].weight.detach().double()
        zero = (w == 0)
        if method == "magnitude":  # per layer: exactly round(sp * numel), the smallest |W|
            assert int(zero.sum()) == round(sp * w.numel())
            assert float(w0.abs()[zero].max()) <= float(w0.abs()[~zero].min())
        else:  # per output row: exactly round(sp * in) each, the smallest |W| * ||X||
            assert bool((zero.sum(1) == round(sp * w.shape[1])).all())
            if name in norms:
                score = w0.abs() * norms[name]
                lo = torch.where(zero, score, torch.full_like(score, -1)).amax(1)
                hi = torch.where(~zero, score, torch.full_like(score, float("inf"))).amin(1)
                assert bool((lo <= hi).all())
        total, zeros = total + w.numel(), zeros + int(zero.sum())
    assert rec["sparsity"] == pytest.approx(zeros / total) and abs(rec["sparsity"] - sp) < 0.01
    assert rec["kind"] == "prune_unstructured" and rec["layer_map"] == list(range(6))
    json.dumps(rec, allow_nan=False)
    before = {n: (w == 0).clone() for n, w in ws.items()}
    train_one_step(pruned, calib)
    for name, w in masked_weights(pruned).items():
        assert torch.equal(w == 0, before[name])  # the same weights stay zero after AdamW
    assert not any(hasattr(m, "weight_mask") for m in model.modules())


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_2_4_pattern_in_every_group(model, calib, method):
    pruned, rec = prune_2_4(model, method=method, calib_ids=calib)
    assert rec["sparsity"] == 0.5 and rec["params"]["method"] == method
    orig = dict(model.named_modules())
    for step in range(2):
        for name, w in masked_weights(pruned).items():
            nz = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
            assert bool((nz == 2).all()), name
            if method == "magnitude":
                g0 = orig[name].weight.detach().abs().reshape(w.shape[0], -1, 4)
                kept = (w != 0).reshape_as(g0)
                assert bool((torch.where(kept, g0, torch.inf).amin(-1) >= torch.where(~kept, g0, -1).amax(-1)).all())
        if step == 0:
            train_one_step(pruned, calib)  # the pattern survives training


def test_sparsity_bad_arguments(model, calib):
    for sp in (1.0, -0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="sparsity"):
            prune_unstructured(model, sp)
    with pytest.raises(ValueError, match="method"):
        prune_unstructured(model, 0.5, method="random")
    with pytest.raises(ValueError, match="calib_ids"):
        prune_unstructured(model, 0.5, method="wanda")
    with pytest.raises(ValueError, match="calib_ids"):
        prune_2_4(model, method="wanda", calib_ids=torch.zeros(0, 4, dtype=torch.long))
    odd = small_llama(layers=1, inter=90)
    with pytest.raises(ValueError, match="multiple of 4"):
        prune_2_4(odd)


def test_zero_sparsity_is_identity(model, calib):
    pruned, rec = prune_unstructured(model, 0.0)
    assert rec["sparsity"] == 0.0
    with torch.no_grad():
        torch.testing.assert_close(pruned(calib).logits, model(calib).logits)
