"""Models whose block linears are not nn.Linear itself: GPT-2 (HF Conv1D, weight [in, out]), Falcon
(FalconLinear, an nn.Linear subclass with its own forward), and mixture-of-experts models whose experts
are fused 3-D weights (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE in transformers 5). Every
degradation applies to them, the saved directory loads back into the original class computing the
degraded function, and the exact compressed model comes back from sdft_state.pt. Before, quantizing or
pruning them was refused or failed."""
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
from transformers.models.mixtral.modeling_mixtral import MixtralExperts  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

LAYERS = 3
# (config, layer class, such layers per block)
ARCHS = {"gpt2": (lambda v: transformers.GPT2Config(n_layer=LAYERS, n_embd=32, n_head=2, vocab_size=v), Conv1D, 4),
         "falcon": (lambda v: transformers.FalconConfig(num_hidden_layers=LAYERS, hidden_size=32, num_attention_heads=2,
                                                        vocab_size=v), FalconLinear, 4),
         # MoE: one fused experts module per block, 4 experts, top-2
         "mixtral": (lambda v: transformers.MixtralConfig(num_hidden_layers=LAYERS, hidden_size=32, intermediate_size=48,
                                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=v,
                                                          num_local_experts=4, num_experts_per_tok=2), MixtralExperts, 1),
         "qwen3_moe": (lambda v: transformers.Qwen3MoeConfig(num_hidden_layers=LAYERS, hidden_size=32, head_dim=8,
                                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=v,
                                                             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24),
                       Qwen3MoeExperts, 1),
         # with a shared expert beside the routed ones, and its [1, H] sigmoid gate (both nn.Linear)
         "qwen2_moe": (lambda v: transformers.Qwen2MoeConfig(num_hidden_layers=LAYERS, hidden_size=32, num_attention_heads=4,
                                                             num_key_value_heads=2, vocab_size=v, num_experts=4,
                                                             num_experts_per_tok=2, moe_intermediate_size=24,
                                                             shared_expert_intermediate_size=40),
                       Qwen2MoeExperts, 1)}


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


def test_experts_in_an_unknown_layout_are_refused_and_a_study_stops_before_its_first_run(tmp_path):
    """GPT-OSS's experts carry biases and a clamped, interleaved gate/up: left fused, hence refused."""
    from sdft_kernels.study import StudyConfig, run_study
    _, tok = models.tiny_random_model(num_layers=1, hidden_size=16)
    cfg = transformers.GptOssConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                                    vocab_size=len(tok))
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match=r"outside nn.Linear layers \(model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        apply_spec(parse_spec("rtn:4"), model, tok)
    model.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    study = StudyConfig.quick_config(model=str(tmp_path / "moe"))
    with pytest.raises(ValueError, match="experts"):  # forget:4 first in the list: refused before it runs
        run_study(dataclasses.replace(study, specs=("forget:4", "rtn:2")), tmp_path / "out", progress=False,
                  log=lambda *a: None)
    assert not (tmp_path / "out" / "units").exists()


def test_experts_the_probe_does_not_match_are_refused_before_a_study_runs():
    """Shaped like Mixtral's fused experts but computing act(up) * gate (the halves the other way round):
    check_degradable, what a study calls before its first run, refuses them as the degradation does; it
    had passed any module of that shape."""
    from sdft_kernels.degrade.common import check_degradable
    _, tok = models.tiny_random_model(num_layers=1, hidden_size=16)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(ARCHS["mixtral"][0](len(tok))).eval()
    check_degradable(model)  # the real layout is covered
    experts = model.model.layers[1].mlp.experts

    def swapped(hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(experts.gate_up_proj.shape[0]):
            tok_i, slot = torch.where(top_k_index == e)
            up, gate = torch.nn.functional.linear(hidden_states[tok_i], experts.gate_up_proj[e]).chunk(2, dim=-1)
            y = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
            out.index_add_(0, tok_i, y * top_k_weights[tok_i, slot, None])
        return out

    experts.forward = swapped
    where = r"outside nn.Linear layers \(model\.layers\.1\.mlp\.experts\.gate_up_proj"
    with pytest.raises(ValueError, match=where):
        check_degradable(model)
    with pytest.raises(ValueError, match=where):
        apply_spec(parse_spec("rtn:4"), model, tok)


def _mixtral_with_an_unrouted_expert(tok):
    """5 experts, top-2; router rows +-u, +-v and 0: every token has one of experts 0/1 and one of 2/3
    above 0, so expert 4 (logit 0) is never chosen."""
    cfg = ARCHS["mixtral"][0](len(tok))
    cfg.num_local_experts = 5
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            u, v = torch.randn(2, cfg.hidden_size)
            layer.mlp.gate.weight.copy_(torch.stack([u, -u, v, -v, torch.zeros_like(u)]))
    return model


@pytest.mark.parametrize("text", ["gptq:3", "wanda:0.5"])
def test_an_expert_no_calibration_token_reaches_is_degraded_from_its_weights(text):
    """GPTQ's Hessian and Wanda's input norms are 0 for an expert the router never chose: GPTQ would zero
    every column as dead and Wanda would prune at random. Such an expert is rounded to nearest / pruned by
    magnitude; the router's weights are kept as they were (full precision); the routed experts get GPTQ."""
    from sdft_kernels.degrade.experts import UnfusedExperts
    from sdft_kernels.degrade.prune import _unstructured_mask
    from sdft_kernels.degrade.quantize import quantize_rtn
    _, tok = models.tiny_random_model(num_layers=1, hidden_size=16)
    ids = data.token_blocks(tok, data.load_text("calibration")[:20000], 32, max_blocks=4)
    model = _mixtral_with_an_unrouted_expert(tok)
    new, rec = apply_spec(parse_spec(text), model, tok, calib_ids=ids)
    ref = quantize_rtn(model, bits=3)[0] if text.startswith("gptq") else None
    by_name = {e["name"]: e for e in rec["layers"]}
    for li, layer in enumerate(new.model.layers):
        assert isinstance(layer.mlp.experts, UnfusedExperts)
        assert torch.equal(layer.mlp.gate.weight, model.model.layers[li].mlp.gate.weight)
        for part in ("gate_up", "down"):
            name = f"model.layers.{li}.mlp.experts.{part}.4"
            entry = by_name[name]
            w = new.get_submodule(name)
            if text.startswith("gptq"):
                assert entry["calib_rows"] == 0 and entry["method"] == "rtn (no calibration rows)"
                assert w.quantized_weight().abs().sum() > 0
                torch.testing.assert_close(w.quantized_weight(), ref.get_submodule(name).quantized_weight(), rtol=0, atol=0)
                assert by_name[name[:-1] + "0"]["method"] == "gptq"
            else:  # Wanda's per-row selection, on |W| alone
                assert entry["scores"] == "magnitude"
                want = _unstructured_mask(w.weight_orig.detach().abs().double(), 0.5, per_row=True)
                assert torch.equal(w.weight_mask.bool(), want)
                assert by_name[name[:-1] + "0"]["scores"] == "wanda"
