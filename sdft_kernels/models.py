"""Loading the embedded default model (and other local causal LMs) with no network, finding their decoder
blocks, and building tiny random-weight models for fast tests.

The default model is a small LLaMA-style causal LM trained by python/train_default_model.py on CPython
standard-library sources and shipped under sdft_kernels/assets/default_model/ (safetensors + tokenizer +
training_record.json).
"""
from __future__ import annotations

from pathlib import Path

import torch

_REBUILD_HINT = "rebuild it with: python python/train_default_model.py --max-minutes 35"


def default_model_path() -> Path:
    """Directory of the shipped default model (package data)."""
    return Path(__file__).resolve().parent / "assets" / "default_model"


def _check_dir(path: Path, is_default: bool) -> None:
    if not path.is_dir():
        hint = f"; {_REBUILD_HINT}" if is_default else ""
        raise FileNotFoundError(f"model directory not found: {path}{hint}")
    if not (path / "config.json").is_file():
        hint = f"; {_REBUILD_HINT}" if is_default else ""
        raise ValueError(f"{path} is not a causal LM directory: it has no config.json{hint}")


def load_model(path=None, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) from a local directory, offline; path=None loads the embedded default.

    The model is returned in eval mode with dtype `dtype`. A directory whose config is not a causal LM
    raises ValueError naming the path.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if path is not None and not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str, pathlib.Path or None, got {type(path).__name__}")
    is_default = path is None
    path = default_model_path() if is_default else Path(path)
    _check_dir(path, is_default)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} does not hold a readable model config: {exc}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dtype,
                                                     local_files_only=True)
    except ValueError as exc:
        raise ValueError(f"{path} is not a causal LM (model_type {getattr(config, 'model_type', '?')!r} "
                         f"has no causal-LM head): {exc}") from exc
    except OSError as exc:
        raise ValueError(f"{path} has a config but no loadable weights: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} has no loadable tokenizer: {exc}") from exc
    if tokenizer.pad_token is None:  # batching needs a pad token; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


# Attribute paths of the decoder-block list in common Hugging Face layouts, tried in order.
_LAYER_PATHS = (
    ("model", "layers"),            # LLaMA, Mistral, Qwen2/3, Gemma, Phi-3
    ("model", "decoder", "layers"),  # OPT
    ("transformer", "h"),           # GPT-2, GPT-J, Falcon, Bloom
    ("gpt_neox", "layers"),         # GPT-NeoX, Pythia
    ("layers",),                    # a bare base model (LlamaModel, ...)
    ("decoder", "layers"),          # a bare OPT decoder
    ("h",),                         # a bare GPT2Model
)


def context_length(model_or_config) -> int | None:
    """The longest token sequence a model accepts (its config's max_position_embeddings; GPT-2's
    n_positions answers to that name too), or None when the config states none. Takes a model (DDP /
    peft wrappers included) or a config."""
    from .align import unwrap
    obj = unwrap(model_or_config) if isinstance(model_or_config, torch.nn.Module) else model_or_config
    cfg = getattr(obj, "config", obj)
    ctx = getattr(cfg, "max_position_embeddings", None)
    return int(ctx) if isinstance(ctx, int) and ctx > 0 else None


def decoder_layers(model) -> torch.nn.ModuleList:
    """The ModuleList of decoder blocks of a causal LM (e.g. model.model.layers for LLaMA)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for attrs in _LAYER_PATHS:
        obj = model
        for a in attrs:
            obj = getattr(obj, a, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj
    tried = ", ".join(".".join(a) for a in _LAYER_PATHS)
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: none of {tried} "
                     "is a non-empty ModuleList")


def load_default_tokenizer():
    """The default model's tokenizer (byte-level BPE, vocab 4096), loaded offline."""
    from transformers import AutoTokenizer

    path = default_model_path()
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"default tokenizer not found under {path}; {_REBUILD_HINT}")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tiny_random_model(num_layers: int = 4, hidden_size: int = 64, seed: int = 0):
    """(model, tokenizer): a random-weight LlamaForCausalLM sized for fast tests, using the default
    tokenizer's vocabulary. Deterministic in `seed`; the global RNG state is left untouched."""
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, value in (("num_layers", num_layers), ("hidden_size", hidden_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if hidden_size % 16 != 0:
        raise ValueError(f"hidden_size must be a multiple of 16 (head_dim 16), got {hidden_size}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    tokenizer = load_default_tokenizer()
    heads = hidden_size // 16
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size,
        intermediate_size=((hidden_size * 8 // 3) + 15) // 16 * 16,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model, tokenizer
