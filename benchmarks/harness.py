"""One benchmark harness for every kernel: timing, peak memory, floors, CSV rows.

A benchmark module describes *cases* (kernel, provider, mode, sizes, dtype, a builder); the harness
runs each one and turns it into rows of benchmarks/results/<kernel>.csv.

Why each case runs in its own process on CPU: the CPU has no allocator statistics, so the only honest
peak-memory number is the process's resident set. We fork a child per case from a parent that has
imported torch but never computed anything (so no OpenMP pool is forked), reset the kernel's peak-RSS
counter (/proc/self/clear_refs, "5") after the inputs exist, and read VmHWM - VmRSS(baseline). The same
child does the timing, so a case that crashes, runs out of memory or hangs costs one row, not the run.
On CUDA the allocator's peak statistics are exact, so cases run in-process (a CUDA context must never be
forked).
"""
from __future__ import annotations

import csv
import ctypes
import gc
import math
import os
import socket
import statistics
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLUMNS = ["kernel", "provider", "mode", "metric", "unit", "sizes", "dtype", "median", "p20", "p80",
           "floor_fraction", "floor", "reps", "status", "device", "torch", "commit", "timestamp",
           "threads", "load1"]


@dataclass
class Case:
    """One provider on one input. `build()` runs in the measuring process and returns a dict:
      step(state) -> output   the timed work (one forward, backward or forward+backward)
      prepare() -> state      untimed work before each step (clear .grad, run the forward for "backward")
      extra() -> {metric: (value, unit)}   optional, e.g. the error against the float64 reference
    `bytes` / `flops` are what the problem must move / compute (not what this provider happens to do);
    the floor time is max(bytes / bandwidth, flops / GEMM rate) from the same run."""
    kernel: str
    provider: str
    mode: str
    sizes: dict
    dtype: str
    build: Callable[[], dict]
    bytes: float = 0.0
    flops: float = 0.0
    gemm_dtype: Optional[str] = None   # which GEMM rate bounds this case (default: the case dtype)
    slow: bool = False                 # few repetitions (peers that take seconds per call)
    timeout: float = 300.0
    skip: Optional[str] = None         # a reason this provider cannot run here (row, not a gap)
    est_bytes: float = 0.0             # rough peak need; CPU cases that would not fit are skipped

    @property
    def sizes_str(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.sizes.items())


@dataclass
class Settings:
    device: str = "cpu"
    quick: bool = False
    out_dir: Path = RESULTS_DIR
    min_reps: int = 3
    max_reps: int = 20
    budget_s: float = 2.0        # timing budget per case, after warm-up
    measure_memory: bool = True
    floors: dict = field(default_factory=dict)   # {"bandwidth": B/s, "gemm_float32": flop/s, ...}


# ----------------------------------------------------------------------------- process memory (CPU)

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return -1


def _status_meminfo(key: str) -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return -1.0


def _fix_malloc():
    """Make freed large blocks go back to the OS at once, so RSS tracks live tensors (glibc raises its
    mmap threshold dynamically, which would hide a later peak inside already-resident heap)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)   # M_MMAP_THRESHOLD: fixed at 1 MiB (disables the dynamic rise)
        libc.mallopt(-1, 1 << 20)   # M_TRIM_THRESHOLD
        return libc
    except OSError:
        return None


def _reset_peak_rss(libc) -> int:
    """Trim the heap, reset VmHWM to the current RSS and return that baseline (kB)."""
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS:")


# ----------------------------------------------------------------------------- timing

def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _call(step, prepare, device, mem=False, libc=None):
    """One call of the case: (seconds, peak bytes beyond what existed before it, or None)."""
    state = prepare() if prepare else None
    _sync(device)
    peak = None
    if mem:
        if device == "cuda":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base_kb = _reset_peak_rss(libc)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = step(state)
        end.record()
        torch.cuda.synchronize()
        dt = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        out = step(state)
        dt = time.perf_counter() - t0
    if mem:   # read while the outputs (loss, gradients) are still alive: they are part of the cost
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = (_status_kb("VmHWM:") - base_kb) * 1024
    del out, state
    return dt, peak


def quantiles(samples):
    s = sorted(samples)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")
    return statistics.median(s), q[1], q[7]   # median, p20, p80


def measure(case: Case, st: Settings) -> dict:
    """Run one case in the current process: warm-up, timed repetitions, peak memory, extras.
    How many repetitions follows from the timed calls, not the warm-up (which also pays first-touch page
    faults and any compile: at N=4096, V=128256 fp32 ours took 3.2 s there and 0.6 s after, and was
    timed once): calls over budget / min_reps get min_reps repetitions (one if a call exceeds the whole
    budget), faster ones repeat until the budget is spent (max_reps at most). A slow provider (seconds
    per call) whose warm-up took over 4x the budget is timed on that first call alone (reps=1)."""
    libc = _fix_malloc() if st.device == "cpu" else None
    spec = case.build()
    step, prepare, extra = spec["step"], spec.get("prepare"), spec.get("extra")
    mem_first = st.measure_memory and case.slow
    first, peak = _call(step, prepare, st.device, mem=mem_first, libc=libc)   # warm-up (and any compile)
    samples = []
    if case.slow and first > 4 * st.budget_s:
        samples = [first]
    else:
        t_end = time.perf_counter() + st.budget_s
        while True:
            # The first timed call also reads the peak memory (its counters are reset before the clock starts).
            dt, pk = _call(step, prepare, st.device, mem=st.measure_memory and peak is None, libc=libc)
            samples.append(dt)
            peak = pk if peak is None else peak
            fastest = min(samples)
            slow = case.slow or fastest > st.budget_s / max(st.min_reps, 1)
            reps_wanted = (1 if fastest > st.budget_s else st.min_reps) if slow else st.max_reps
            if len(samples) >= reps_wanted or (len(samples) >= st.min_reps and time.perf_counter() > t_end):
                break
    res = {"first": first, "samples": samples}
    if st.measure_memory:
        res["peak_bytes"] = peak
    if extra is not None:
        res["extra"] = extra()
    return res


def _child(case, st, path):
    try:
        torch.set_num_threads(st.threads) if getattr(st, "threads", None) else None
        res = measure(case, st)
    except Exception as e:  # report, never hide: the parent writes it as the row's status
        res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}",
               "trace": traceback.format_exc()[-2000:]}
    import json
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, path)


def run_isolated(case: Case, st: Settings) -> dict:
    """CPU: measure in a forked child (fresh peak-RSS counter, crash/timeout contained). CUDA: in-process."""
    if st.device == "cuda":
        try:
            return measure(case, st)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {"error": "out of memory"}
        except Exception as e:
            torch.cuda.empty_cache()
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    import json
    import multiprocessing as mp
    fd, path = tempfile.mkstemp(prefix="sdft_bench_", suffix=".json")
    os.close(fd)
    os.unlink(path)
    proc = mp.get_context("fork").Process(target=_child, args=(case, st, path))
    proc.start()
    proc.join(case.timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"error": f"timeout after {case.timeout:.0f} s"}
    if not os.path.exists(path):
        code = proc.exitcode
        why = "killed (out of memory?)" if code in (-9, 137) else f"child exited with code {code}"
        return {"error": why}
    with open(path) as f:
        res = json.load(f)
    os.unlink(path)
    return res


# ----------------------------------------------------------------------------- rows and CSV

_ENV_CACHE = {}


def environment(device: str) -> dict:
    if device not in _ENV_CACHE:
        root = Path(__file__).resolve().parent.parent
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                    text=True, timeout=10).stdout.strip() or "unknown"
            # the rows this harness appends to benchmarks/results are no change to what is measured
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                    ":(exclude)benchmarks/results"], cwd=root,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            commit += "+dirty" if dirty else ""
        except Exception:
            commit = "unknown"
        if device == "cuda":
            name = torch.cuda.get_device_name()
        else:
            name = "cpu"
            try:
                for line in open("/proc/cpuinfo"):
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
            except OSError:
                pass
            name = f"{name} x{os.cpu_count()} ({socket.gethostname()})"
        _ENV_CACHE[device] = {"device": name, "torch": torch.__version__, "commit": commit}
    return _ENV_CACHE[device]


def floor_time(case: Case, st: Settings):
    """Seconds the hardware needs at least for this case, and which ceiling sets it."""
    bw = st.floors.get("bandwidth")
    rate = st.floors.get(f"gemm_{case.gemm_dtype or case.dtype}") or st.floors.get("gemm_float32")
    t_mem = case.bytes / bw if (bw and case.bytes) else 0.0
    t_gemm = case.flops / rate if (rate and case.flops) else 0.0
    if t_mem == 0.0 and t_gemm == 0.0:
        return None, ""
    return (t_mem, "bandwidth") if t_mem >= t_gemm else (t_gemm, f"gemm_{case.gemm_dtype or case.dtype}")


def rows_for(case: Case, res: dict, st: Settings) -> list:
    env = environment(st.device)
    base = {"kernel": case.kernel, "provider": case.provider, "mode": case.mode, "sizes": case.sizes_str,
            "dtype": case.dtype, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "threads": torch.get_num_threads(), "load1": f"{os.getloadavg()[0]:.2f}", **env}
    blank = {"median": "", "p20": "", "p80": "", "floor_fraction": "", "floor": "", "reps": ""}
    if case.skip or "error" in res:
        return [{**base, **blank, "metric": "time", "unit": "s",
                 "status": f"skipped: {case.skip}" if case.skip else f"failed: {res['error']}"}]
    rows = []
    med, p20, p80 = quantiles(res["samples"])
    ft, which = floor_time(case, st)
    rows.append({**base, "metric": "time", "unit": "s", "median": f"{med:.6g}", "p20": f"{p20:.6g}",
                 "p80": f"{p80:.6g}", "floor_fraction": f"{ft / med:.4f}" if ft else "", "floor": which,
                 "reps": len(res["samples"]), "status": "ok"})
    if case.provider.startswith("torch.compile"):
        rows.append({**base, **blank, "metric": "compile_time", "unit": "s",
                     "median": f"{res['first'] - med:.4g}", "reps": 1, "status": "ok (first call - median)"})
    if "peak_bytes" in res:
        mb = res["peak_bytes"] / 2**20
        rows.append({**base, **blank, "metric": "peak_mem", "unit": "MiB", "median": f"{mb:.1f}", "reps": 1,
                     "status": "ok (beyond inputs; " + ("allocator peak)" if st.device == "cuda"
                                                        else "peak RSS in a fresh process)")})
    for metric, (value, unit) in (res.get("extra") or {}).items():
        rows.append({**base, **blank, "metric": metric, "unit": unit, "median": f"{value:.4g}"
                     if isinstance(value, float) and math.isfinite(value) else str(value), "reps": 1,
                     "status": "ok"})
    return rows


def append_rows(rows: list, out_dir: Path, kernel_file: str):
    """Append rows to <out_dir>/<kernel_file>.csv atomically (copy + append + replace)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{kernel_file}.csv"
    old = ""
    if path.exists():
        with open(path, newline="") as f:  # as stored: read_text() turned the rows' \r\n into \n, so each
            old = f.read()                 # append rewrote every earlier line (a whole-file git diff)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{kernel_file}.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        if old:
            f.write(old if old.endswith("\n") else old + "\n")
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if not old:
            w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    return path


def run_cases(cases: list, st: Settings, csv_name: str, log=print, deadline: float | None = None) -> list:
    """Run every case, write its rows as soon as it finishes, return all rows. Cases that would start
    after `deadline` (a time.perf_counter() value) are recorded as skipped instead."""
    all_rows = []
    for case in cases:
        if not case.skip and deadline is not None and time.perf_counter() > deadline:
            case.skip = "not run: past the run's --deadline"
        if not case.skip and st.device == "cpu" and case.est_bytes:
            avail = _status_meminfo("MemAvailable:")
            if avail > 0 and case.est_bytes > 0.7 * avail:
                # The machine is shared: an OOM kill could hit someone else's process, so do not try.
                case.skip = f"needs ~{case.est_bytes / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
        res = {} if case.skip else run_isolated(case, st)
        rows = rows_for(case, res, st)
        append_rows(rows, st.out_dir, csv_name)
        all_rows.extend(rows)
        if log:
            log(format_case(rows))
    return all_rows


def format_case(rows: list) -> str:
    """One line per case: provider, case, median time, peak memory, floor fraction (or the status)."""
    r = {x["metric"]: x for x in rows}
    t = r.get("time", rows[0])
    head = f"{t['kernel']:<22} {t['provider']:<26} {t['mode']:<8} {t['dtype']:<8} {t['sizes']:<34}"
    if t["status"] != "ok":
        return f"{head} {t['status']}"
    mem = r.get("peak_mem", {}).get("median", "")
    frac = t["floor_fraction"]
    line = f"{head} {float(t['median']) * 1e3:>10.2f} ms  {mem + ' MiB' if mem else '':>12}  " \
           f"{'floor ' + format(float(frac), '.0%') if frac else '':>10}"
    if "compile_time" in r:
        line += f"  compile {float(r['compile_time']['median']):.1f} s"
    for k, v in r.items():
        if k not in ("time", "peak_mem", "compile_time"):
            line += f"  {k}={v['median']}"
    return line


def pytest_benchmark_case(benchmark, case: Case, device: str):
    """Run one case through pytest-benchmark (in-process timing only; `sdft bench` isolates cases and
    adds peak memory and floors). Shared by every benchmarks/test_bench_*.py."""
    import pytest

    if case.skip:
        pytest.skip(case.skip)
    spec = case.build()
    step, prepare = spec["step"], spec.get("prepare")
    benchmark.group = f"{case.kernel} {case.dtype} {case.sizes_str}"
    step(prepare() if prepare else None)   # warm-up (and torch.compile's compile)

    def run(state):
        out = step(state)
        _sync(device)
        return out

    benchmark.pedantic(run, setup=lambda: ((prepare() if prepare else None,), {}),
                       rounds=1 if case.slow else 5, iterations=1)
