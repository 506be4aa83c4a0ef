"""The benchmark harness's own behaviour (no timing is asserted: machines here are shared and noisy)."""
import csv
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402


def _case(provider, calls):
    def build():
        calls.append(provider)
        return {"step": lambda _: None}
    return harness.Case("toy", provider, "full", {"n": 1}, "float32", build)


def test_cases_past_the_deadline_are_recorded_as_skipped_not_run(tmp_path):
    # A time-limited run (the GPU check has minutes of device time) must still end with a row per case.
    st = harness.Settings(out_dir=tmp_path, measure_memory=False, budget_s=0.01, min_reps=1, max_reps=1)
    calls = []
    rows = harness.run_cases([_case("a", calls), _case("b", calls)], st, "toy", log=None,
                             deadline=time.perf_counter() - 1.0)
    assert calls == []
    assert [r["status"] for r in rows] == ["skipped: not run: past the run's --deadline"] * 2
    with open(tmp_path / "toy.csv") as f:
        assert [r["provider"] for r in csv.DictReader(f)] == ["a", "b"]
