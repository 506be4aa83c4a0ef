"""Models whose block linears are not nn.Linear itself: GPT-2 (HF Conv1D, weight [in, out]) and Falcon
(FalconLinear, an nn.Linear subclass with its own forward). Every degradation applies to them, the saved
directory loads back into the original class computing the degraded function, and the exact compressed
model comes back from sdft_state.pt. Before, quantizing or pruning them failed ("no nn.Linear layers")."""
import copy
import dataclasses

import pytest
import torch

from sdft_kernels import data, models
from sdft_kernels.degrade.common import linearize_blocks
from sdft_kernels.io import load_model_dir, save_model_dir
from sdft_kernels.recover import RecoverConfig, merge_lora, recover
from sdft_kernels.specs import apply_spec, parse_spec

transformers = pytest.importorskip("transformers")
from transformers.models.falcon.modeling_falcon import FalconLinear  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

LAYERS = 3
# (config, layer class, such layers per block)
ARCHS = {"gpt2": (lambda v: transformers.GPT2Config(n_layer=LAYERS, n_embd=32, n_head=2, vocab_size=v), Conv1D, 4),
         "falcon": (lambda v: transformers.FalconConfig(num_hidden_layers=LAYERS, hidden_size=32, num_attention_heads=2,
                                                        vocab_size=v), FalconLinear, 4)}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request):
    make_cfg, kind, per_block = ARCHS[request.param]
    _, tok = models.tiny_random_model(num_layers=1, hidden_size=16)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_cfg(len(tok))).eval()
    ids = data.token_blocks(tok, data.load_text("calibration")[:20000], 32, max_blocks=8)
    assert count(model, kind) == per_block * LAYERS
    return model, tok, ids, kind


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def count(model, kind):
    return sum(type(m) is kind for m in model.modules())


def test_linearize_keeps_the_function(arch):
    model, _, ids, kind = arch
    lin = copy.deepcopy(model)
    n = count(model, kind)
    assert linearize_blocks(lin) == n and count(lin, kind) == 0
    torch.testing.assert_close(logits(lin, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    assert linearize_blocks(lin) == 0  # idempotent


@pytest.mark.parametrize("text", ["rtn:3", "gptq:2", "wanda:0.5", "wanda2:4", "magnitude:0.5"])
def test_degrade_save_and_load(arch, tmp_path, text):
    model, tok, ids, kind = arch
    n = count(model, kind)
    new, record = apply_spec(parse_spec(text), model, tok, calib_ids=ids[:4])
    assert count(model, kind) == n  # the input model is untouched
    out = logits(new, ids[4:])
    assert (out - logits(model, ids[4:])).abs().max() > 1e-3  # the degradation changed the model
    save_model_dir(new, tok, tmp_path / "m", record)
    # the plain directory is the original class again (Conv1D: [in, out] layout) computing the degraded function
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(plain) is type(model) and count(plain, kind) == n
    torch.testing.assert_close(logits(plain, ids[4:]), out, rtol=1e-4, atol=1e-4)
    # and the compressed model comes back exactly
    back, _, rec = load_model_dir(tmp_path / "m")
    assert rec["kind"] == record["kind"]
    torch.testing.assert_close(logits(back, ids[4:]), out, rtol=0, atol=1e-6)
    assert sorted(n for n, _ in back.named_buffers() if n.endswith("_mask")) == \
        sorted(n for n, _ in new.named_buffers() if n.endswith("_mask"))


def test_lora_recovery_saves_the_trained_model(arch, tmp_path):
    model, tok, ids, kind = arch
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    res = recover(model, student, ids, RecoverConfig(steps=2, batch_size=2, lr=1e-2, lora=True, lora_r=2),
                  progress=False)
    merged = merge_lora(res.student)
    save_model_dir(merged, tok, tmp_path / "r")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "r").eval()
    assert count(plain, kind) == count(model, kind)
    torch.testing.assert_close(logits(plain, ids), logits(merged, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("text", ["rtn:3", "gptq:2", "wanda:0.5", "magnitude2:4"])
def test_weights_outside_linear_layers_are_refused_before_work(text):
    """A block weight that is no nn.Linear's (fused MoE experts, a router's bare weight) would be left at
    full precision while the record calls the model compressed: refused, naming it."""
    model, tok = models.tiny_random_model(num_layers=2, hidden_size=32)
    model.model.layers[1].mlp.register_parameter("experts_up", torch.nn.Parameter(torch.randn(4, 8, 32)))
    ids = data.token_blocks(tok, data.load_text("calibration")[:4000], 16, max_blocks=2)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts_up \[4, 8, 32\]"):
        apply_spec(parse_spec(text), model, tok, calib_ids=ids)
    new, rec = apply_spec(parse_spec("blocks:1"), model, tok, calib_ids=ids)  # whole blocks: any model
    assert len(rec["layer_map"]) == 1


def test_fused_moe_experts_are_refused_and_a_study_stops_before_its_first_run(tmp_path):
    from sdft_kernels.study import StudyConfig, run_study
    _, tok = models.tiny_random_model(num_layers=1, hidden_size=16)
    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                     vocab_size=len(tok))
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    if all(p.dim() < 3 for p in model.parameters()):
        pytest.skip("this transformers keeps Mixtral's experts as nn.Linear layers")
    with pytest.raises(ValueError, match="outside nn.Linear layers"):
        apply_spec(parse_spec("rtn:4"), model, tok)
    model.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    study = StudyConfig.quick_config(model=str(tmp_path / "moe"))
    with pytest.raises(ValueError, match="experts"):  # forget:4 first in the list: refused before it runs
        run_study(dataclasses.replace(study, specs=("forget:4", "rtn:2")), tmp_path / "out", progress=False,
                  log=lambda *a: None)
    assert not (tmp_path / "out" / "units").exists()
