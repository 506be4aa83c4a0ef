"""The shipped narrow task: deterministic examples, the template, answer extraction, response-only
labels, and batched (left-padded) greedy generation equal to one-at-a-time generation."""
import pytest

from sdft_kernels import tasks
from sdft_kernels.models import tiny_random_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model(num_layers=2, hidden_size=32, seed=0)


def test_examples_deterministic_and_correct():
    a, b = tasks.make_examples(50, seed=7), tasks.make_examples(50, seed=7)
    assert a == b and a != tasks.make_examples(50, seed=8)
    for ex in a:
        assert 4 <= len(ex.numbers) <= 6 and all(0 <= d <= 9 for d in ex.numbers)
        assert [int(t) for t in ex.answer.split()] == sorted(ex.numbers)
    assert len({ex.numbers for ex in tasks.make_examples(200, seed=0)}) > 190  # varied
    short = tasks.make_examples(5, seed=0, min_len=2, max_len=2)
    assert all(len(ex.numbers) == 2 for ex in short)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="n"):
            tasks.make_examples(bad)
    with pytest.raises(ValueError, match="seed"):
        tasks.make_examples(3, seed="x")


def test_template_and_extraction():
    ex = tasks.Example((7, 3, 9, 1))
    assert tasks.format_prompt(ex) == (
        "### Instruction:\nSort these numbers in ascending order: 7 3 9 1\n\n### Response:\n")
    assert tasks.format_response(ex) == "The answer is 1 3 7 9."
    assert tasks.extract_answer(tasks.format_example(ex)) == "1 3 7 9"
    assert tasks.extract_answer("blah\nThe answer is 1  3 7\t9. The answer is 2 2") == "1 3 7 9"
    assert tasks.extract_answer("The answer is") is None
    assert tasks.extract_answer("I think 1 3 7 9") is None
    assert tasks.is_correct(ex, "The answer is 1 3 7 9") and not tasks.is_correct(ex, "The answer is 1 3 9 7.")
    assert not tasks.is_correct(ex, "The answer is 1 3 7 91.") and not tasks.is_correct(ex, "The answer is 1 3 7 999")
    assert tasks.Example((7, 3)).to_dict() == {"numbers": [7, 3], "instruction":
                                                  "Sort these numbers in ascending order: 7 3", "answer": "3 7"}


def test_sft_batch_labels_only_the_response(tiny):
    _, tok = tiny
    exs = tasks.make_examples(4, seed=1)
    ids, mask, labels = tasks.sft_batch(tok, exs)
    for i, ex in enumerate(exs):
        n = int(mask[i].sum())
        assert tok.decode(ids[i, :n]) == tasks.format_example(ex) + tok.eos_token
        resp = labels[i][labels[i] != -100]
        assert tok.decode(resp) == tasks.format_response(ex) + tok.eos_token
        assert bool((labels[i, n:] == -100).all())


def test_batched_generation_equals_single(tiny):
    model, tok = tiny
    exs = tasks.make_examples(5, seed=2, min_len=2, max_len=6)  # different prompt lengths -> left padding
    batched = tasks.generate_responses(model, tok, exs, max_new_tokens=6, batch_size=5)
    single = [tasks.generate_responses(model, tok, [ex], max_new_tokens=6)[0] for ex in exs]
    assert batched == single


def test_task_accuracy_counts_exact_answers(tiny, monkeypatch):
    model, tok = tiny
    exs = tasks.make_examples(8, seed=3)
    fake = [tasks.format_response(ex) if i % 4 else "The answer is 0" for i, ex in enumerate(exs)]
    monkeypatch.setattr(tasks, "generate_responses", lambda *a, **k: fake)
    assert tasks.task_accuracy(model, tok, exs) == pytest.approx(6 / 8)
    monkeypatch.undo()
    acc = tasks.task_accuracy(model, tok, exs, max_new_tokens=4)  # random weights: no correct answers
    assert acc == 0.0
    with pytest.raises(ValueError, match="examples"):
        tasks.task_accuracy(model, tok, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        tasks.task_accuracy(model, tok, exs, max_new_tokens=0)
