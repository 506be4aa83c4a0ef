"""Degradation spec strings: parsed and range-checked before any work."""
import pytest

from sdft_kernels.specs import parse_spec


def test_quantization_options():
    s = parse_spec("gptq:3:g64:asym:act")
    assert (s.kind, s.value, s.options) == ("gptq", 3, {"group_size": 64, "symmetric": False, "act_order": True})
    assert parse_spec("rtn:4").options == {"group_size": 128, "symmetric": True}


@pytest.mark.parametrize("text, match", [("rtn:3:act", "act"), ("gptq:5", "bits"), ("gptq:4:g0", "g0"),
                                         ("blocks:6", "at most 5"), ("wanda:1.5", "sparsity")])
def test_bad_specs_name_the_problem(text, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(text, n_layers=6)
