"""GPT-2-style models (decoder linears are HF Conv1D, weight [in, out]): every degradation applies to
them, the saved directory loads back into the original class computing the degraded function, and the
exact compressed model comes back from sdft_state.pt. Before, quantizing or pruning them failed."""
import copy

import pytest
import torch

from sdft_kernels import data, models
from sdft_kernels.degrade.common import linearize_conv1d
from sdft_kernels.io import load_model_dir, save_model_dir
from sdft_kernels.recover import RecoverConfig, merge_lora, recover
from sdft_kernels.specs import apply_spec, parse_spec

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


@pytest.fixture(scope="module")
def gpt2():
    _, tok = models.tiny_random_model(num_layers=1, hidden_size=16)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=128)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = data.token_blocks(tok, data.load_text("calibration")[:20000], 32, max_blocks=8)
    return model, tok, ids


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def conv1d_count(model):
    return sum(type(m) is Conv1D for m in model.modules())


def test_linearize_keeps_the_function(gpt2):
    model, _, ids = gpt2
    lin = copy.deepcopy(model)
    assert linearize_conv1d(lin) == 4 * 3 and conv1d_count(lin) == 0
    torch.testing.assert_close(logits(lin, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    assert linearize_conv1d(lin) == 0  # idempotent


@pytest.mark.parametrize("text", ["rtn:3", "gptq:2", "wanda:0.5", "wanda2:4", "magnitude:0.5"])
def test_degrade_save_and_load_a_gpt2(gpt2, tmp_path, text):
    model, tok, ids = gpt2
    new, record = apply_spec(parse_spec(text), model, tok, calib_ids=ids[:4])
    assert conv1d_count(model) == 12  # the input model is untouched
    out = logits(new, ids[4:])
    assert (out - logits(model, ids[4:])).abs().max() > 1e-3  # the degradation changed the model
    save_model_dir(new, tok, tmp_path / "m", record)
    # the plain directory is a GPT-2 again (Conv1D layout) computing the degraded function
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(plain) is type(model) and conv1d_count(plain) == 12
    torch.testing.assert_close(logits(plain, ids[4:]), out, rtol=1e-4, atol=1e-4)
    # and the compressed model comes back exactly
    back, _, rec = load_model_dir(tmp_path / "m")
    assert rec["kind"] == record["kind"]
    torch.testing.assert_close(logits(back, ids[4:]), out, rtol=0, atol=1e-6)
    assert sorted(n for n, _ in back.named_buffers() if n.endswith("_mask")) == \
        sorted(n for n, _ in new.named_buffers() if n.endswith("_mask"))


def test_lora_recovery_of_a_gpt2_saves_the_trained_model(gpt2, tmp_path):
    model, tok, ids = gpt2
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    res = recover(model, student, ids, RecoverConfig(steps=2, batch_size=2, lr=1e-2, lora=True, lora_r=2),
                  progress=False)
    merged = merge_lora(res.student)
    save_model_dir(merged, tok, tmp_path / "r")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "r").eval()
    assert conv1d_count(plain) == 12
    torch.testing.assert_close(logits(plain, ids), logits(merged, ids), rtol=1e-4, atol=1e-4)
