"""Forgetting by SFT on the narrow task: the task loss falls, general-text perplexity moves, the run is
deterministic in its seed, and the input model is untouched."""
import json

import pytest
import torch

from sdft_kernels import tasks
from sdft_kernels.degrade.forget import forget_sft
from sdft_kernels.evaluate import perplexity
from sdft_kernels.models import tiny_random_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model(num_layers=2, hidden_size=32, seed=0)


@pytest.fixture(scope="module")
def general_ids(tiny):
    _, tok = tiny
    try:
        from sdft_kernels.data import load_text
        text = load_text("heldout")[:4000]
    except Exception:  # the shipped text is not available: any real prose works here
        text = __doc__ * 20
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:400])


def test_forget_reduces_task_loss_and_moves_general_perplexity(tiny, general_ids):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ppl0 = perplexity(model, general_ids, window=128, stride=64)
    new, rec = forget_sft(model, tok, 30, lr=3e-3, batch_size=8, eval_ids=general_ids, eval_window=128,
                          task_eval_examples=32, log_every=5)
    assert rec["kind"] == "forget_sft" and rec["layer_map"] == [0, 1]
    assert rec["params"]["steps"] == 30 and rec["params"]["lr"] == 3e-3
    json.dumps(rec, allow_nan=False)
    curve = rec["loss_curve"]
    assert [s for s, _ in curve] == [5, 10, 15, 20, 25, 30]
    assert curve[-1][1] < 0.7 * curve[0][1]
    assert rec["task_loss_after"] < 0.7 * rec["task_loss_before"]
    held = tasks.make_examples(32, seed=1_000_003)
    assert tasks.task_loss(new, tok, held) == pytest.approx(rec["task_loss_after"], rel=1e-5)
    assert rec["perplexity_before"] == pytest.approx(ppl0, rel=1e-6)
    assert abs(rec["perplexity_after"] / rec["perplexity_before"] - 1) > 0.01  # general capability moved
    assert not new.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_forget_is_deterministic_in_seed(tiny):
    model, tok = tiny
    a, ra = forget_sft(model, tok, 3, lr=1e-3, batch_size=4, seed=5, task_eval_examples=4)
    torch.manual_seed(123)  # the global RNG state must not matter
    b, rb = forget_sft(model, tok, 3, lr=1e-3, batch_size=4, seed=5, task_eval_examples=4)
    c, rc = forget_sft(model, tok, 3, lr=1e-3, batch_size=4, seed=6, task_eval_examples=4)
    assert ra["loss_curve"] == rb["loss_curve"] and ra["loss_curve"] != rc["loss_curve"]
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("kwargs, arg", [
    ({"steps": 0}, "steps"), ({"steps": -3}, "steps"), ({"steps": 2.5}, "steps"),
    ({"steps": 2, "lr": 0.0}, "lr"), ({"steps": 2, "lr": float("nan")}, "lr"),
    ({"steps": 2, "batch_size": 0}, "batch_size"), ({"steps": 2, "seed": "a"}, "seed"),
    ({"steps": 2, "eval_ids": torch.zeros(2, 3, dtype=torch.long)}, "eval_ids"),
])
def test_forget_bad_arguments(tiny, kwargs, arg):
    model, tok = tiny
    with pytest.raises(ValueError, match=arg):
        forget_sft(model, tok, **kwargs)
