"""The whole pipeline on tiny random models of many Hugging Face architectures: every degradation kind,
save, reload as a plain HF model and as the exact compressed model, alignment and one SDFT step. Each
family lays out its blocks differently (fused QKV, parallel attention/MLP, Conv1D, MQA, partial rotary,
post-norms), which is where a degradation can miss layers or a saved directory can stop loading."""
import tempfile

import pytest
import torch

from sdft_kernels import DistillationLoss, data, models
from sdft_kernels.align import align
from sdft_kernels.io import load_model_dir, save_model_dir
from sdft_kernels.recover import RecoverConfig, kl_to_teacher, recover
from sdft_kernels.specs import apply_spec, parse_spec

transformers = pytest.importorskip("transformers")
H, L, I = 32, 3, 64
ARCHS = {  # name: (config class, its arguments beyond vocab_size)
    "mistral": ("MistralConfig", dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
                                      num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
                                  num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8)),
    "phi": ("PhiConfig", dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4)),
    "phi3": ("Phi3Config", dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
                                pad_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4)),
    "opt": ("OPTConfig", dict(hidden_size=H, ffn_dim=I, num_hidden_layers=L, num_attention_heads=4,
                              word_embed_proj_dim=H)),
    "gpt2": ("GPT2Config", dict(n_embd=H, n_layer=L, n_head=4)),
    "gptj": ("GPTJConfig", dict(n_embd=H, n_layer=L, n_head=4, rotary_dim=4)),
    "falcon": ("FalconConfig", dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4)),
    "bloom": ("BloomConfig", dict(hidden_size=H, n_layer=L, n_head=4)),
    "stablelm": ("StableLmConfig", dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
                                        num_key_value_heads=4)),
    "olmo": ("OlmoConfig", dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4)),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(n_embd=H, n_layer=L, n_head=4)),
    "codegen": ("CodeGenConfig", dict(n_embd=H, n_layer=L, n_head=4, rotary_dim=4)),
    # logits scaled after the head (folded into the fused loss's head weight): Cohere x logit_scale,
    # Granite / logits_scaling
    "cohere": ("CohereConfig", dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4)),
    "granite": ("GraniteConfig", dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
                                      logits_scaling=4.0)),
}
# gemma2: logits soft-capped, c * tanh(head / c), applied by the fused loss per chunk; with a small cap,
# so that it bends these tiny models' logits
ARCHS["gemma2"][1]["final_logit_softcapping"] = 0.5


@pytest.fixture(scope="module")
def tok_ids():
    _, tok = models.tiny_random_model(num_layers=1, hidden_size=16)
    return tok, data.token_blocks(tok, data.load_text("calibration")[:20000], 32, max_blocks=6)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_degrade_save_reload_align_recover(arch, tok_ids):
    tok, ids = tok_ids
    cls_name, kw = ARCHS[arch]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"this transformers has no {cls_name}")
    torch.manual_seed(0)
    teacher = transformers.AutoModelForCausalLM.from_config(cls(vocab_size=len(tok), **kw)).eval()
    calib, held = ids[:4], ids[4:]
    ref = logits(teacher, held)
    for text in ("rtn:3", "gptq:2", "wanda2:4", "blocks:1"):
        new, record = apply_spec(parse_spec(text), teacher, tok, calib_ids=calib)
        out = logits(new, held)
        assert (out - ref).abs().max() > 1e-4, text  # the degradation reached the model
        with tempfile.TemporaryDirectory() as d:
            save_model_dir(new, tok, f"{d}/m", record)
            plain = transformers.AutoModelForCausalLM.from_pretrained(f"{d}/m").eval()
            assert type(plain) is type(teacher)
            torch.testing.assert_close(logits(plain, held), out, rtol=1e-4, atol=1e-4, msg=text)
            back, _, _ = load_model_dir(f"{d}/m")
        torch.testing.assert_close(logits(back, held), out, rtol=0, atol=1e-6, msg=text)
    # alignment and one SDFT step on the last one (two blocks mapped onto three)
    cka = align(teacher, back, held[:1], layer_map=record["layer_map"], heatmap=False)["cka"]
    assert len(cka) == L - 1 and all(0.0 <= c <= 1.0 + 1e-6 for c in cka)
    # the divergence SDFT trains on is the one between the models' own logits
    kl = kl_to_teacher(teacher, back, held)
    with torch.no_grad():
        ref = DistillationLoss()(back(input_ids=held).logits, teacher(input_ids=held).logits)
    assert kl == pytest.approx(float(ref), rel=1e-4, abs=1e-7)
    res = recover(teacher, back, calib, RecoverConfig(steps=1, batch_size=2), layer_map=record["layer_map"],
                  progress=False)
    assert torch.isfinite(torch.tensor(res.history[-1]["divergence"]))



def test_a_study_refuses_a_model_whose_logits_the_fused_loss_cannot_reproduce(tok_ids, tmp_path, monkeypatch):
    """An unknown head transform (here: a soft-cap the config does not declare) is refused before any unit."""
    from sdft_kernels import heads
    from sdft_kernels.study import StudyConfig, run_study
    tok, _ = tok_ids
    cls_name, kw = ARCHS["gemma2"]
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(vocab_size=len(tok), **kw))
    model.save_pretrained(tmp_path / "g2")
    tok.save_pretrained(tmp_path / "g2")
    monkeypatch.setattr(heads, "softcap", lambda model: None)
    with pytest.raises(ValueError, match="logits are not its final hidden states times its output head"):
        run_study(StudyConfig.quick_config(model=str(tmp_path / "g2")), tmp_path / "out", progress=False,
                  log=lambda *a: None)
    assert not (tmp_path / "out" / "units").exists()
