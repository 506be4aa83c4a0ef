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


def test_targets_pair_rows_of_one_run_only(tmp_path):
    from benchmarks import targets
    head = ("kernel,provider,mode,metric,unit,sizes,dtype,median,p20,p80,floor_fraction,floor,reps,status,"
            "device,torch,commit,timestamp,threads,load1\n")
    sz = '"L=12,n=8192,d=768,data=llm"'

    def row(provider, ms, commit, ts, sizes=sz):
        return (f"linear_cka_diag,{provider},full,time,ms,{sizes},float32,{ms},,,,,1,ok,cpu x2,2.13.0,{commit},"
                f"{ts},2,1.0\n")

    ck = '"L=12,n=8192,d=768,data=llm,b=1024"'
    path = tmp_path / "linear_cka_diag.csv"
    path.write_text(head + row("ckatorch", 20000, "aaa", "2026-12-01T10:00:00Z", ck) +
                    row("ours", 1000, "bbb", "2026-12-02T10:00:00Z"))
    (got,) = [m for t, m, _ in targets.evaluate(tmp_path) if "ckatorch / ours" in t]
    assert got.startswith("n/a (latest rows from different runs"), got  # not 20x across machines
    path.write_text(path.read_text() + row("ckatorch", 12000, "bbb", "2026-12-02T10:05:00Z", ck))
    (got,) = [m for t, m, _ in targets.evaluate(tmp_path) if "ckatorch / ours" in t]
    assert got == "12.00x"


def test_appending_rows_leaves_earlier_bytes_untouched(tmp_path):
    # csv writes \r\n; re-reading the file with newline translation turned earlier rows' \r\n into \n,
    # so every append rewrote the whole file (and its git history)
    row = {c: "" for c in harness.COLUMNS}
    path = harness.append_rows([dict(row, kernel="a")], tmp_path, "k")
    first = path.read_bytes()
    harness.append_rows([dict(row, kernel="b")], tmp_path, "k")
    after = path.read_bytes()
    assert after.startswith(first) and after != first
    assert [r["kernel"] for r in csv.DictReader(open(path, newline=""))] == ["a", "b"]


def _sleeper(first_s, then_s):
    calls = []

    def build():
        def step(_):
            time.sleep(first_s if not calls else then_s)
            calls.append(1)
        return {"step": step}
    return harness.Case("toy", "sleeper", "full", {"n": 1}, "float32", build)


def test_repetitions_follow_the_timed_calls_not_a_slow_warm_up():
    # A warm-up that pays one-time costs (page faults, compile) over the whole budget must not leave a
    # case that is fast afterwards timed once: N=4096 V=128256 fp32 was, and its one sample was an outlier.
    st = harness.Settings(measure_memory=False, budget_s=0.05, min_reps=3, max_reps=5)
    res = harness.measure(_sleeper(0.2, 0.001), st)
    assert res["first"] >= 0.2 and len(res["samples"]) == 5
    # calls that each exceed the budget are timed once after the warm-up
    res = harness.measure(_sleeper(0.06, 0.06), st)
    assert len(res["samples"]) == 1
    # calls over budget / min_reps but under the budget get min_reps repetitions
    res = harness.measure(_sleeper(0.03, 0.03), st)
    assert len(res["samples"]) == 3


def test_gpu_case_lists_build_without_a_gpu():
    # gpu_check.sh runs these on a lent GPU with minutes of device time: a provider name or size that
    # fails to build there costs the whole check, so the case lists are built here first (no tensors
    # are made until a case runs)
    from benchmarks import bench_cka, bench_distill
    for mod in (bench_distill, bench_cka):
        cases = mod.cases("cuda")
        assert cases and all(c.kernel and c.provider and c.sizes_str for c in cases)
        assert len({(c.kernel, c.provider, c.sizes_str, c.dtype) for c in cases}) == len(cases)
