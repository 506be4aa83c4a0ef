"""Alignment: hooks feed the streaming CKA accumulators; identical models give CKA 1; chunked streaming
through the KV cache equals the whole-block forward; removed blocks map to the teacher's indices."""
import copy

import pytest
import torch

from sdft_kernels.align import align, capture_layer_outputs, check_layer_map, measure_overhead
from sdft_kernels.models import decoder_layers, tiny_random_model
from sdft_kernels.reference.cka import linear_cka as ref_linear_cka  # float64 NumPy reference


@pytest.fixture(scope="module")
def models():
    teacher, _ = tiny_random_model(num_layers=3, hidden_size=32, seed=0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ids = torch.randint(0, teacher.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    return teacher, student, ids


def test_identical_models_give_cka_one(models):
    teacher, _, ids = models
    out = align(teacher, copy.deepcopy(teacher), ids, heatmap=True)
    assert out["tokens"] == ids.numel()
    assert torch.allclose(torch.tensor(out["cka"], dtype=torch.float64), torch.ones(3, dtype=torch.float64), atol=1e-6)
    hm = torch.tensor(out["heatmap"], dtype=torch.float64)
    assert hm.shape == (3, 3)
    assert torch.allclose(hm.diagonal(), torch.ones(3, dtype=torch.float64), atol=1e-6)


def test_matches_float64_reference_on_captured_states(models):
    teacher, student, ids = models
    out = align(teacher, student, ids, heatmap=False, drop_first=1)
    # the same hidden states, captured whole, through the float64 reference
    with torch.no_grad(), capture_layer_outputs(teacher) as tb, capture_layer_outputs(student) as sb:
        teacher(input_ids=ids)
        student(input_ids=ids)
    for i, c in enumerate(out["cka"]):
        x = sb[i][:, 1:].reshape(-1, sb[i].shape[-1]).double().numpy()
        y = tb[i][:, 1:].reshape(-1, tb[i].shape[-1]).double().numpy()
        assert abs(c - float(ref_linear_cka(x, y))) < 1e-6
    assert out["tokens"] == ids.shape[0] * (ids.shape[1] - 1)
    assert all(c < 1 - 1e-4 for c in out["cka"])  # the perturbation is visible


def test_chunked_streaming_equals_whole_block(models):
    teacher, student, ids = models
    whole = align(teacher, student, ids[:2], heatmap=False, drop_first=2)
    chunked = align(teacher, student, ids[:2], heatmap=False, drop_first=2, chunk_len=16)
    assert whole["tokens"] == chunked["tokens"]
    assert torch.allclose(torch.tensor(whole["cka"]), torch.tensor(chunked["cka"]), atol=1e-5)


def test_removed_block_maps_to_teacher_indices(models):
    teacher, _, ids = models
    student = copy.deepcopy(teacher)
    layers = decoder_layers(student)
    del layers[1]  # remove teacher block 1: student blocks 0, 1 are teacher blocks 0, 2
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i
    student.config.num_hidden_layers = len(layers)
    out = align(teacher, student, ids, layer_map=[0, 2], heatmap=True)
    assert out["layer_map"] == [0, 2]
    assert abs(out["cka"][0] - 1.0) < 1e-6  # block 0 is untouched
    assert out["cka"][1] < 1 - 1e-4       # block 2 now sees a different input
    assert torch.tensor(out["heatmap"]).shape == (2, 3)


def test_kernel_cka_on_request(models):
    teacher, _, ids = models
    out = align(teacher, copy.deepcopy(teacher), ids, heatmap=False, kernel="rbf", kernel_tokens=64)
    assert out["kernel"]["tokens"] == 64
    assert all(abs(c - 1) < 1e-6 for c in out["kernel"]["cka"])


def test_overhead_is_measured(models):
    teacher, student, ids = models
    o = measure_overhead(teacher, student, ids[0], repeats=1)
    assert o["forward_s"] > 0 and o["align_s"] > 0 and o["tokens"] == ids.shape[1]


def test_bad_input(models):
    teacher, student, ids = models
    with pytest.raises(ValueError, match="layer_map"):
        check_layer_map(None, 2, 3)
    with pytest.raises(ValueError, match="layer_map"):
        check_layer_map([0, 5], 2, 3)
    with pytest.raises(TypeError, match="token_ids"):
        align(teacher, student, ids.float())
    with pytest.raises(ValueError, match="drop_first"):
        align(teacher, student, ids, drop_first=ids.shape[1])
    with pytest.raises(ValueError, match="kernel"):
        align(teacher, student, ids, kernel="poly")
    for bad in (1.5, "2", -1):  # 1.5 dropped 2 positions and reported 1; "2" was a bare TypeError
        with pytest.raises(ValueError, match="drop_first"):
            align(teacher, student, ids, drop_first=bad)
    for bad in (-1, 0, 3):  # -1 silently used all tokens but one; 0 and 3 failed mid-run naming xs
        with pytest.raises(ValueError, match="heatmap_tokens"):
            align(teacher, student, ids, heatmap_tokens=bad)
    # every chunk keeps <= 3 tokens after drop_first ([0,4) none, [4,8) and [8,10) two): refused up front,
    # not with a MinibatchCKA error after all the forwards
    with pytest.raises(ValueError, match="heatmap: minibatch CKA needs more than 3 tokens"):
        align(teacher, student, ids[:1, :10], chunk_len=4, drop_first=6)
    with pytest.raises(TypeError, match="ids_1d"):  # 2-d ids were silently one long sequence
        measure_overhead(teacher, student, ids, repeats=1)
    with pytest.raises(ValueError, match="repeats"):
        measure_overhead(teacher, student, ids[0], repeats=0)
    with pytest.raises(ValueError, match="kernel_tokens"):  # 1 token passed and gave a NaN CKA
        align(teacher, student, ids, kernel="rbf", kernel_tokens=1)


def test_student_sharing_block_modules_with_the_teacher(models):
    # Block removal built by reusing the teacher's own blocks (and one model passed as both): every hook
    # fired on both forwards, so each side saw the other's states (CKA 1 everywhere, a 4 x 5 heatmap).
    teacher, _, ids = models
    student = copy.deepcopy(teacher)
    blocks = decoder_layers(student)
    del blocks[:]
    blocks.extend([decoder_layers(teacher)[0], decoder_layers(teacher)[2]])
    student.config.num_hidden_layers = 2
    out = align(teacher, student, ids, layer_map=[0, 2])
    with torch.no_grad(), capture_layer_outputs(teacher) as tb:
        teacher(input_ids=ids)
    with torch.no_grad(), capture_layer_outputs(student) as sb:
        student(input_ids=ids, use_cache=False)  # its block 1 is the teacher's block 2 (layer_idx 2)
    ref = [float(ref_linear_cka(sb[i].reshape(-1, 32).double().numpy(), tb[j].reshape(-1, 32).double().numpy()))
           for i, j in enumerate([0, 2])]
    assert out["cka"] == pytest.approx(ref, abs=1e-6) and ref[1] < 1 - 1e-3
    assert torch.tensor(out["heatmap"]).shape == (2, 3)
    same = align(teacher, teacher, ids)
    assert torch.tensor(same["heatmap"]).shape == (3, 3) and same["cka"] == pytest.approx([1.0] * 3, abs=1e-6)


def test_modes_are_restored_and_bad_arguments_fail_first(models):
    teacher, student, ids = models
    teacher.train(), student.eval()
    align(teacher, student, ids, heatmap=False)
    assert teacher.training and not student.training
    teacher.eval()
    vocab = teacher.config.vocab_size
    for kw, match in [(dict(token_ids=ids + vocab), "vocabulary"), (dict(batch_size=0), "batch_size"),
                      (dict(chunk_len=0), "chunk_len"), (dict(layer_map={0: 0, 1: 1, 2: 2}), "layer_map"),
                      (dict(chunk_len=1, heatmap=True), "more than 3 tokens"),
                      (dict(kernel="linear", kernel_tokens=0), "kernel_tokens")]:
        args = dict(token_ids=ids, heatmap=False)
        args.update(kw)
        with pytest.raises((ValueError, TypeError), match=match):
            align(teacher, student, args.pop("token_ids"), **args)
