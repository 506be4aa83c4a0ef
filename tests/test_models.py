"""The embedded default model (offline load, generation, real perplexity) and sdft_kernels.models helpers."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdft_kernels import data, models


@pytest.fixture(scope="module")
def default():
    path = models.default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.eval(), tok


def test_default_model_is_shipped_small_and_recorded():
    path = models.default_model_path()
    weights = path / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 25 * 2 ** 20
    record = json.loads((path / "training_record.json").read_text())
    ev = record["evaluation"]
    # The recorded held-out perplexity beats every count baseline fit on all 1.95M training tokens,
    # the Kneser-Ney bigram included (104 vs 135 for the shipped model; see README).
    assert ev["heldout_ppl"] < ev["baselines"]["bigram_kn"] < ev["baselines"]["bigram_add1"]
    assert ev["baselines"]["bigram_add1"] < ev["baselines"]["unigram_add1"]
    assert ev["degradation"]["drop_2_blocks"]["ppl"] > ev["heldout_ppl"]
    assert record["parameters"] > 1_000_000


def test_default_model_generates_text(default):
    model, tok = default
    assert tok.eos_token is not None and tok.pad_token is not None and tok.bos_token is not None
    prompt = "def read_file(path):\n    "
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert text.strip()


@torch.no_grad()
def test_default_model_beats_count_baselines_on_heldout(default):
    """Perplexity on ~3k held-out tokens must be well below the Kneser-Ney bigram (and far below the
    unigram) baseline fit on the shipped training text and scored on exactly the same tokens."""
    model, tok = default
    blocks = data.token_blocks(tok, data.load_text("heldout"), 256, max_blocks=12, stride=256)
    logits = model(input_ids=blocks).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    ppl = math.exp(float(nll))
    train_ids = data.encode(tok, data.load_text("train"))
    # each block's first token has no context for the model; score the bigram on the same targets
    base = data.ngram_baselines(train_ids, blocks, len(tok))
    assert ppl < 0.6 * base["bigram_kn"] and ppl < 0.3 * base["unigram_add1"], (ppl, base)


def test_load_model_default_and_dtype():
    model, tok = models.load_model()
    assert not model.training and model.dtype == torch.float32
    assert len(models.decoder_layers(model)) == model.config.num_hidden_layers
    m16, _ = models.load_model(dtype=torch.bfloat16)
    assert m16.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype"):
        models.load_model(dtype=torch.int64)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        models.load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="config.json"):
        models.load_model(tmp_path)
    from transformers import ViTConfig
    vit = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(vit)
    with pytest.raises(ValueError, match=str(vit)):
        models.load_model(vit)
    with pytest.raises(TypeError, match="path"):
        models.load_model(3)


def test_decoder_layers_layouts():
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM
    llama, _ = models.tiny_random_model(num_layers=3, hidden_size=32)
    assert models.decoder_layers(llama) is llama.model.layers and len(llama.model.layers) == 3
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    assert models.decoder_layers(gpt2) is gpt2.transformer.h
    opt = OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                                   word_embed_proj_dim=32, vocab_size=50))
    assert models.decoder_layers(opt) is opt.model.decoder.layers
    assert models.decoder_layers(llama.model) is llama.model.layers
    with pytest.raises(ValueError, match="decoder blocks of Linear"):
        models.decoder_layers(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        models.decoder_layers("llama")


def test_tiny_random_model_is_deterministic_and_fast():
    state = torch.random.get_rng_state()
    a, tok = models.tiny_random_model(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    b, _ = models.tiny_random_model(seed=1)
    c, _ = models.tiny_random_model(seed=2)
    assert a.config.vocab_size == len(tok) and a.config.num_hidden_layers == 4
    w = lambda m: m.model.layers[0].mlp.up_proj.weight  # noqa: E731
    assert torch.equal(w(a), w(b)) and not torch.equal(w(a), w(c))
    ids = data.token_blocks(tok, data.load_text("calibration")[:4000], 32, max_blocks=2)
    assert a(input_ids=ids).logits.shape == (2, 32, len(tok))
    for bad in ({"num_layers": 0}, {"hidden_size": 40}, {"seed": 1.5}):
        with pytest.raises(ValueError):
            models.tiny_random_model(**bad)
