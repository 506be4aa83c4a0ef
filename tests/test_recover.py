"""SDFT recovery: it reduces the divergence to the teacher and the perplexity of a degraded model,
a resumed run is bit-identical to an uninterrupted one, and compressed students stay compressed."""
import copy
import dataclasses
import json

import pytest
import torch

from sdft_kernels.degrade.quantize import QuantLinear, quantize_rtn
from sdft_kernels.evaluate import perplexity
from sdft_kernels.models import tiny_random_model
from sdft_kernels.recover import RecoverConfig, batch_rows, kl_to_teacher, recover


def peaky_teacher(seed=0):
    """A tiny random model with sharp next-token distributions (final norm scaled up), so that a
    degradation changes its predictions measurably."""
    model, tok = tiny_random_model(num_layers=2, hidden_size=32, seed=seed)
    with torch.no_grad():
        model.model.norm.weight.mul_(10.0)
    return model, tok


@pytest.fixture(scope="module")
def setup():
    teacher, tok = peaky_teacher()
    g = torch.Generator().manual_seed(0)
    # text the teacher itself produces: on it the teacher is the best model, so a student's excess
    # perplexity is its divergence from the teacher
    with torch.no_grad():
        start = torch.randint(0, teacher.config.vocab_size, (64, 1), generator=g)
        torch.manual_seed(0)
        text = teacher.generate(input_ids=start, do_sample=True, max_new_tokens=23, min_new_tokens=23,
                                pad_token_id=0, eos_token_id=None)
    train, held = text[:16], text[16:]
    student, record = quantize_rtn(teacher, 2, group_size=16)
    return teacher, student, train, held, record


def test_sdft_reduces_kl_and_perplexity_and_keeps_masks(setup):
    from sdft_kernels.degrade.prune import prune_unstructured
    teacher, _, train, held, _ = setup
    student, record = prune_unstructured(teacher, 0.5, method="magnitude")
    ppl_t = perplexity(teacher, held.reshape(-1), window=24, stride=24)
    ppl_0 = perplexity(student, held.reshape(-1), window=24, stride=24)
    kl_0 = kl_to_teacher(teacher, student, held)
    res = recover(teacher, student, train, RecoverConfig(steps=10, batch_size=4, lr=3e-4, schedule="constant"),
                  layer_map=record["layer_map"], progress=False)
    kl_1 = kl_to_teacher(teacher, res.student, held)
    ppl_1 = perplexity(res.student, held.reshape(-1), window=24, stride=24)
    assert ppl_0 > ppl_t  # the degradation hurt
    assert kl_1 < 0.9 * kl_0, (kl_0, kl_1)
    assert ppl_1 < ppl_0, (ppl_t, ppl_0, ppl_1)
    first, last = res.history[:3], res.history[-3:]
    assert sum(h["divergence"] for h in last) < sum(h["divergence"] for h in first)
    # still pruned: the same masks, the masked weights exactly zero
    masked = [(m, m.weight_mask) for m in res.student.modules() if hasattr(m, "weight_mask")]
    assert masked
    for m, mask in masked:
        assert torch.all(m.weight[mask == 0] == 0)
        assert 0.4 < float((mask == 0).float().mean()) < 0.6


def test_resume_equals_uninterrupted(setup, tmp_path):
    teacher, degraded, train, held, record = setup
    cfg = RecoverConfig(steps=4, batch_size=3, lr=1e-3, checkpoint_every=2, align_blocks=1)
    a = recover(teacher, copy.deepcopy(degraded), train, cfg, out_dir=tmp_path / "a", align_ids=held,
                progress=False)
    # "killed" after step 2 (checkpointed), then a fresh process-like restart from a fresh copy
    recover(teacher, copy.deepcopy(degraded), train, cfg, out_dir=tmp_path / "b", align_ids=held,
            progress=False, stop_after=2)
    torch.manual_seed(1234)  # a resumed run must not depend on the caller's RNG state
    b = recover(teacher, copy.deepcopy(degraded), train, cfg, out_dir=tmp_path / "b", align_ids=held,
                progress=False)
    assert b.resumed_from == 2
    sa, sb = a.student.state_dict(), b.student.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert [t["step"] for t in a.trajectory] == [t["step"] for t in b.trajectory] == [0, 2, 4]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().strip().splitlines()
    assert len(lines) == 4
    # killed before its first checkpoint: the rerun starts at step 0 and must not append to the old log
    recover(teacher, copy.deepcopy(degraded), train, cfg, out_dir=tmp_path / "c", progress=False, stop_after=1)
    (tmp_path / "c" / "checkpoint.pt").unlink()
    recover(teacher, copy.deepcopy(degraded), train, cfg, out_dir=tmp_path / "c", progress=False)
    assert [json.loads(x)["step"] for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    # a checkpoint of other training blocks is not resumed as if it were this run
    with pytest.raises(ValueError, match="train_ids: .*other training blocks"):
        recover(teacher, copy.deepcopy(degraded), train[:-1], cfg, out_dir=tmp_path / "b", progress=False)
    # other settings are named; the wrapping strategy is free (a full-state checkpoint resumes under either)
    with pytest.raises(ValueError, match="lr: 0.001 there, 0.002 now"):
        recover(teacher, copy.deepcopy(degraded), train, dataclasses.replace(cfg, lr=2e-3), out_dir=tmp_path / "b",
                progress=False)
    recover(teacher, copy.deepcopy(degraded), train, dataclasses.replace(cfg, steps=4), out_dir=tmp_path / "d",
            progress=False, stop_after=2)
    d = recover(teacher, copy.deepcopy(degraded), train, dataclasses.replace(cfg, strategy="fsdp"),
                out_dir=tmp_path / "d", progress=False)
    assert d.resumed_from == 2 and [h["loss"] for h in d.history] == [h["loss"] for h in a.history]
    # a quantized student stays quantized: QuantLinear layers, weights on their 2-bit grids
    qs = [m for m in b.student.modules() if isinstance(m, QuantLinear)]
    assert len(qs) == len([m for m in degraded.modules() if isinstance(m, QuantLinear)]) > 0
    for q in qs:
        levels = torch.unique(torch.round(q.quantized_weight() / q.scales.repeat_interleave(q.group_size, 1)))
        assert levels.numel() <= 3  # symmetric 2-bit: {-1, 0, +1} * scale


def test_lora_trains_adapters_only(setup):
    teacher, _, train, held, _ = setup
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    res = recover(teacher, student, train, RecoverConfig(steps=2, batch_size=2, lr=1e-2, lora=True, lora_r=2),
                  progress=False)
    after = res.student.get_base_model().state_dict()
    changed = [k for k in after if "lora_" in k and not torch.equal(after[k], torch.zeros_like(after[k]))]
    assert changed
    base = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    assert all(torch.equal(before[k], base[k]) for k in before)
    # a quantized student: merging the dense adapters would re-quantize them, the saved model would not
    # be the trained one; refused before any training
    _, degraded, *_ = setup
    with pytest.raises(ValueError, match="lora: the student is quantized"):
        recover(teacher, copy.deepcopy(degraded), train, RecoverConfig(steps=2, batch_size=2, lora=True),
                progress=False)


def test_batch_rows_is_a_pure_function_of_step():
    rows = [batch_rows(s, 10, 4, seed=3) for s in range(5)]
    assert rows == [batch_rows(s, 10, 4, seed=3) for s in range(5)]
    flat = [r for b in rows for r in b]
    assert sorted(flat[:10]) == list(range(10))  # first epoch is a permutation


@pytest.mark.parametrize("kw, msg", [
    ({"steps": 0}, "steps"), ({"divergence": "kl"}, "divergence"), ({"temperature": 0.0}, "temperature"),
    ({"beta": 1.5}, "beta"), ({"lr": -1.0}, "lr"), ({"ce_weight": -0.1}, "ce_weight"),
    ({"warmup_steps": -5}, "warmup"), ({"lora": True, "lora_r": 0}, "lora_r"),
])
def test_bad_config_is_rejected(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RecoverConfig(**kw).validate()


def test_bad_inputs_fail_before_training(setup):
    teacher, degraded, train, held, _ = setup
    with pytest.raises(TypeError, match="train_ids"):
        recover(teacher, degraded, train.float(), RecoverConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="layer_map"):
        recover(teacher, degraded, train, RecoverConfig(steps=1), layer_map=[0], progress=False)
    other, _ = tiny_random_model(num_layers=2, hidden_size=32, seed=1)
    other.resize_token_embeddings(100)
    with pytest.raises(ValueError, match="vocabulary"):
        recover(teacher, other, train, RecoverConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="teacher object"):
        recover(teacher, teacher, train, RecoverConfig(steps=1), progress=False)


def test_selfdata_filter_keeps_only_consistent_rewrites():
    from sdft_kernels import tasks
    from sdft_kernels.selfdata import consistency_filter
    exs = tasks.make_examples(3, seed=0)
    rewrites = [f"Sorted: {exs[0].answer}.",                             # no "The answer is" -> original
                f"The answer is {exs[1].answer}.",                   # consistent -> kept
                "The answer is 9 9 9 9 9 9 9."]                       # wrong answer -> original kept
    responses, kept = consistency_filter(exs, rewrites)
    assert kept == [False, True, False]
    assert responses[1] == rewrites[1]
    assert responses[0] == tasks.format_response(exs[0]) and responses[2] == tasks.format_response(exs[2])


def test_selfdata_end_to_end_on_tiny_model(setup):
    from sdft_kernels import tasks
    from sdft_kernels.selfdata import SFTConfig, finetune, self_distill
    teacher, _, _, _, _ = setup
    _, tok = tiny_random_model(num_layers=2, hidden_size=32, seed=0)
    exs = tasks.make_examples(4, seed=0)
    responses, stats = self_distill(teacher, tok, exs, max_new_tokens=8)
    assert stats["total"] == 4 and 0.0 <= stats["kept_fraction"] <= 1.0
    student = copy.deepcopy(teacher)
    losses = finetune(student, tok, exs, responses, SFTConfig(steps=4, batch_size=4, lr=3e-3))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("chunk", [1, 5, 7, 64])
def test_chunked_cross_entropy_equals_full_logits(chunk):
    """Value and gradients (hidden and head weight) equal plain cross-entropy on the full logits, for
    chunks that do and do not divide N, with ignored targets."""
    from sdft_kernels.losses import chunked_cross_entropy
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 37, bias=True).double()
    h = torch.randn(23, 16, generator=g, dtype=torch.float64, requires_grad=True)
    tgt = torch.randint(0, 37, (23,), generator=g)
    tgt[[2, 9]] = -100
    got = chunked_cross_entropy(h, head, tgt, chunk_size=chunk)
    gh, gw = torch.autograd.grad(got, (h, head.weight))
    want = torch.nn.functional.cross_entropy(head(h), tgt, reduction="sum")
    wh, ww = torch.autograd.grad(want, (h, head.weight))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)  # summed in float32
    torch.testing.assert_close(gh, wh, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gw, ww, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy(h, head, tgt[:-1])


def test_a_quantized_lm_head_is_what_the_fused_loss_reads(setup):
    """With include_lm_head the head is a QuantLinear: SDFT's fused loss must use its fake-quantized weight
    (as its forward does), not the latent one; the KL it reports equals the KL of the models' own logits."""
    from sdft_kernels import DistillationLoss
    teacher, _, train, held, _ = setup
    student, _ = quantize_rtn(teacher, 2, group_size=16, include_lm_head=True)
    assert isinstance(student.get_output_embeddings(), QuantLinear)
    with torch.no_grad():
        ref = DistillationLoss()(student(input_ids=held).logits, teacher(input_ids=held).logits)
    assert kl_to_teacher(teacher, student, held) == pytest.approx(float(ref), rel=1e-5)
    # and training reaches the head's latent weight through the straight-through estimator
    w0 = student.get_output_embeddings().weight.detach().clone()
    recover(teacher, student, train, RecoverConfig(steps=2, batch_size=4, lr=1e-3, schedule="constant"),
            progress=False)
    assert not torch.equal(student.get_output_embeddings().weight.detach(), w0)
