"""The study summary, report and plots with undefined (NaN) CKA values, in memory and read back from JSON."""
import copy

import pytest

from sdft_kernels import io as sio
from sdft_kernels import report

NAN = float("nan")
TEACHER = {"eval": {"perplexity": 10.0, "task_accuracy": 0.5}, "self_cka": [1.0] * 3, "n_layers": 3,
           "n_params": 1e6, "align_overhead": {"tokens": 64, "chunk_len": 32, "align_s": 1.0, "forward_s": 0.9,
                                               "overhead": 0.11}}
CFG = {"model": None, "recover": {"divergence": "forward_kl", "steps": 1, "batch_size": 2, "lr": 1e-3},
       "block_len": 64}


def _run(i, ppl_d, ppl_r, cka_b, cka_a):
    def al(c):
        return {"cka": c, "mean_cka": sum(c) / len(c), "layer_map": [0, 1, 2]}
    return {"name": f"r{i}", "spec": f"rtn:{i}", "family": "quantization", "kind": "quantize_rtn",
            "before": {"eval": {"perplexity": ppl_d, "task_accuracy": 0.3}, "align": al(cka_b), "kl_to_teacher": 0.5},
            "after": {"eval": {"perplexity": ppl_r, "task_accuracy": 0.4}, "align": al(cka_a),
                      "kl_to_teacher": 0.2 + i / 10},
            "trajectory": [], "history": [{"step": 1, "loss": 1.0}], "recover_seconds": 1.0, "structure_kept": {}}


@pytest.mark.parametrize("n_runs", [2, 4])
@pytest.mark.parametrize("from_json", [False, True])
def test_undefined_cka_is_na_not_a_crash(tmp_path, n_runs, from_json):
    # A zero-variance layer or too few tokens give NaN CKA; a unit's JSON turns it into null (a resumed
    # study reads that back). Both crashed summarize / the plots; now n/a, left out of the correlations.
    runs = [_run(i, 20 + 10 * i, 12 + 4 * i, [.9 - .1 * i, .8, .7], [.95, .9 - .05 * i, .85]) for i in range(n_runs)]
    runs[1]["after"]["align"]["cka"][2] = NAN
    runs[1]["after"]["align"]["mean_cka"] = NAN
    if from_json:
        sio.atomic_write_json(tmp_path / "units.json", runs)
        runs = sio.read_json(tmp_path / "units.json")
    m = report.summarize(TEACHER, copy.deepcopy(runs))
    row = m["runs"][1]
    assert row["cka_after"] is None and row["cka_gain"] is None and row["min_cka_after"] is None
    assert m["runs"][0]["cka_after"] == pytest.approx(sum([.95, .9, .85]) / 3)
    if n_runs >= 4:  # 3 runs with defined values remain for the correlation
        assert m["correlation"]["recovery_ppl~cka_after"]["n"] == 3
    report.write_outputs(tmp_path / "out", CFG, TEACHER, runs, m)
    assert "n/a" in (tmp_path / "out" / "report.md").read_text()
