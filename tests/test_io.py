"""Atomic writes and the compressed-model save/load round trip."""
import json
import math
import os

import pytest
import torch

from sdft_kernels import io as sio
from sdft_kernels.models import tiny_random_model


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    p = tmp_path / "sub" / "a.json"
    sio.atomic_write_json(p, {"x": 1})
    assert sio.read_json(p) == {"x": 1}

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        sio.atomic_write_json(p, {"x": 2})
    monkeypatch.undo()
    assert sio.read_json(p) == {"x": 1}  # the old file is intact
    assert [f.name for f in p.parent.iterdir()] == ["a.json"]  # no temp file left behind


def test_json_values(tmp_path):
    obj = {"t": torch.tensor([1.5, 2.0]), "s": torch.tensor(3), "nan": float("nan"), "inf": math.inf,
           "tup": (1, 2), "path": tmp_path}
    sio.atomic_write_json(tmp_path / "v.json", obj)
    back = json.loads((tmp_path / "v.json").read_text())
    assert back == {"t": [1.5, 2.0], "s": 3, "nan": None, "inf": None, "tup": [1, 2], "path": str(tmp_path)}


def test_csv_union_of_columns(tmp_path):
    sio.atomic_write_csv(tmp_path / "m.csv", [{"a": 1, "b": 2.5}, {"a": 3, "c": None}])
    assert (tmp_path / "m.csv").read_text() == "a,b,c\n1,2.5,\n3,,\n"


def test_jsonl_roundtrip_drops_a_cut_line(tmp_path):
    p = tmp_path / "m.jsonl"
    sio.atomic_write_jsonl(p, [{"step": 1}, {"step": 2}])
    with open(p, "a") as f:
        f.write('{"step": 3, "lo')  # killed mid-line
    assert sio.read_jsonl(p) == [{"step": 1}, {"step": 2}]


def test_torch_save_load(tmp_path):
    state = {"w": torch.randn(3, 4), "rng": torch.get_rng_state()}
    sio.atomic_torch_save(state, tmp_path / "c.pt")
    back = sio.torch_load(tmp_path / "c.pt")
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["rng"], state["rng"])


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model(num_layers=2, hidden_size=32, seed=0)


def _same_outputs(a, b, ids):
    with torch.no_grad():
        return torch.allclose(a(input_ids=ids).logits, b(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("kind", ["rtn", "prune", "blocks"])
def test_compressed_model_round_trip(tmp_path, tiny, kind):
    from sdft_kernels.degrade.prune import prune_blocks, prune_unstructured
    from sdft_kernels.degrade.quantize import QuantLinear, quantize_rtn
    model, tok = tiny
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    if kind == "rtn":
        deg, rec = quantize_rtn(model, 3, group_size=16)
        with torch.no_grad():  # latent weights off the grid: the saved state must keep them exactly
            for m in deg.modules():
                if isinstance(m, QuantLinear):
                    m.weight.add_(1e-4)
    elif kind == "prune":
        deg, rec = prune_unstructured(model, 0.5, method="magnitude")
    else:
        deg, rec = prune_blocks(model, 1, ids)
    sio.save_model_dir(deg, tok, tmp_path / "m", rec)
    back, tok2, rec2 = sio.load_model_dir(tmp_path / "m")
    assert rec2["kind"] == rec["kind"] and rec2["layer_map"] == rec["layer_map"]
    assert _same_outputs(deg, back, ids)
    sd_a, sd_b = deg.state_dict(), back.state_dict()
    for k in sd_a:
        if "lm_head" not in k:
            assert torch.equal(sd_a[k], sd_b[k]), k
    if kind == "rtn":
        assert sum(isinstance(m, QuantLinear) for m in back.modules()) == \
            sum(isinstance(m, QuantLinear) for m in deg.modules()) > 0
    if kind == "prune":
        assert sum(hasattr(m, "weight_mask") for m in back.modules()) > 0
    # the plain Hugging Face copy loads with transformers alone and computes the same function
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True)
    assert _same_outputs(deg, plain, ids)
