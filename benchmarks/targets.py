"""The issue targets (issues 3 and 4) evaluated from the recorded CSV rows: ratios within one run.

python -m benchmarks.targets [DIR] [--device cpu]: prints a Markdown table (target, measured, met?).
Every number comes from the latest CSV row of each case; a ratio only pairs rows of one run (same
device and commit, recorded within RUN_WINDOW_S of each other), otherwise it shows as n/a: machines
here differ between sessions by 2x, so a ratio across runs would mean nothing. A missing or failed
case shows as such.
"""
from __future__ import annotations

import argparse
import csv
from datetime import datetime
from pathlib import Path

RUN_WINDOW_S = 3600.0


def _load(dir_: Path, kernel: str, device: str):
    rows = {}
    path = dir_ / f"{kernel}.csv"
    if not path.exists():
        return rows
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            is_gpu = any(w in r["device"] for w in ("NVIDIA", "H100", "H200", "A100"))
            if (device == "cuda") == is_gpu:
                rows[(r["provider"], r["sizes"], r["dtype"], r["metric"])] = r
    return rows


class _Value(float):
    """A measured number that remembers its CSV row (for the same-run check of _ratio)."""
    row: dict


def _val(rows, provider, sizes, dtype, metric="time"):
    r = rows.get((provider, sizes, dtype, metric))
    if r is None:
        return None, "no row"
    if not r["status"].startswith("ok"):
        return None, r["status"]
    try:
        v = _Value(float(r["median"]))
    except ValueError:
        return None, r["median"]
    v.row = r
    return v, ""


def _same_run(a: dict, b: dict) -> bool:
    dt = abs((datetime.fromisoformat(a["timestamp"].replace("Z", "+00:00")) -
              datetime.fromisoformat(b["timestamp"].replace("Z", "+00:00"))).total_seconds())
    return a["device"] == b["device"] and a["commit"] == b["commit"] and dt <= RUN_WINDOW_S


def _ratio(a, b):
    """a / b for two rows of one run (b may be a constant); None (shown as n/a) when either is missing or
    the runs differ."""
    if a is None or b in (None, 0.0) or (isinstance(b, _Value) and not _same_run(a.row, b.row)):
        return None
    return a / b


def _why(a, b, *whys):
    """Why _ratio(a, b) is None: a row's status, or that the latest rows come from different runs."""
    why = next((w for w in whys if w), "")
    if not why and isinstance(a, _Value) and isinstance(b, _Value) and not _same_run(a.row, b.row):
        why = f"latest rows from different runs: {a.row['commit']} {a.row['timestamp']} vs " \
              f"{b.row['commit']} {b.row['timestamp']}"
    return why


def evaluate(dir_: Path, device: str = "cpu") -> list:
    out = []

    def add(target, value, ok, fmt="{:.2f}x", why=""):
        shown = fmt.format(value) if value is not None else f"n/a ({why})"
        out.append((target, shown, "-" if value is None else ("yes" if ok(value) else "no")))

    d = _load(dir_, "distill_loss", device)
    for v in (32000, 128256):
        sz = f"N=4096,V={v},div=forward_kl"
        ours, w = _val(d, "ours", sz, "float32")
        comp, wc = _val(d, "torch.compile(naive)", sz, "float32")
        naive, wn = _val(d, "naive", sz, "float32")
        add(f"distill_loss N=4096 V={v} fp32: torch.compile / ours >= 1.5", _ratio(comp, ours), lambda x: x >= 1.5,
            why=_why(comp, ours, w, wc))
        add(f"distill_loss N=4096 V={v} fp32: naive / ours >= 8", _ratio(naive, ours), lambda x: x >= 8,
            why=_why(naive, ours, w, wn))
        mem, wm = _val(d, "ours", sz, "float32", "peak_mem")
        grad_mib = 4096 * v * 4 / 2**20
        add(f"distill_loss N=4096 V={v} fp32: extra memory / grad buffer ({grad_mib:.0f} MiB) <= 1.05",
            _ratio(mem, grad_mib), lambda x: x <= 1.05, why=wm)
    f = _load(dir_, "fused_linear_distill", device)
    sz = "N=4096,Hs=512,Ht=512,V=32000,div=forward_kl"
    ours, w = _val(f, "ours", sz, "float32")
    mm, wmm = _val(f, "matmuls", sz, "float32")
    add("fused_linear N=4096 Hs=Ht=512 V=32000 fp32: ours / its four matmuls <= 1.2", _ratio(ours, mm),
        lambda x: x <= 1.2, why=_why(ours, mm, w, wmm))
    mo, w1 = _val(f, "ours", sz, "float32", "peak_mem")
    mn, w2 = _val(f, "naive", sz, "float32", "peak_mem")
    add("fused_linear: extra memory ours / naive <= 0.15", _ratio(mo, mn), lambda x: x <= 0.15, "{:.3f}",
        why=_why(mo, mn, w1, w2))

    c = _load(dir_, "linear_cka_diag", device)
    sz = "L=12,n=8192,d=768,data=llm"
    ours, w = _val(c, "ours", sz, "float32")
    ck, wk = _val(c, "ckatorch", sz + ",b=1024", "float32")
    gemm, wg = _val(c, "gemm(float32)", sz, "float32")
    add("linear CKA 12 diagonal pairs n=8192 d=768: ckatorch / ours >= 10", _ratio(ck, ours), lambda x: x >= 10,
        why=_why(ck, ours, w, wk))
    add("linear CKA: ours / bare fp32 GEMM time <= 1.3", _ratio(ours, gemm), lambda x: x <= 1.3,
        why=_why(ours, gemm, w, wg))
    err, we = _val(c, "ours", sz, "float32", "max_abs_err")
    add("linear CKA: max |error| vs float64 on the large-offset data < 1e-6", err, lambda x: x < 1e-6, "{:.2e}",
        why=we)
    m = _load(dir_, "minibatch_cka", device)
    sz = "L=12,n=4096,d=768,b=1024,data=llm"   # the CPU run uses 4 minibatches (cost is per minibatch)
    ours, w = _val(m, "ours", sz, "float32")
    cp, wp = _val(m, "cka-pytorch", sz, "float32")
    add("minibatch CKA 12x12 b=1024 (n=4096): cka-pytorch / ours >= 10", _ratio(cp, ours), lambda x: x >= 10,
        why=_why(cp, ours, w, wp))
    for p in ("ours", "cka-pytorch", "torch-cka"):
        err, we = _val(m, p, sz, "float32", "max_abs_err")
        if err is None and we == "no row":   # a provider that failed has only its time row, with the reason
            we = _val(m, p, sz, "float32")[1] or we
        add(f"minibatch CKA max |error| vs float64 < 1e-4 ({p})", err, lambda x: x < 1e-4, "{:.2e}", why=we)
    h = _load(dir_, "kernel_hsic", device)
    sz = "n=65536,d=256,kernel=rbf,unbiased=True"
    mem, wm = _val(h, "ours", sz, "float32", "peak_mem")
    add("RBF HSIC n=65536 d=256: extra memory < 200 MB", mem, lambda x: x * 2**20 < 200e6, "{:.1f} MiB", why=wm)
    r = h.get(("ours", sz, "float32", "time"))
    frac = float(r["floor_fraction"]) if r and r["status"] == "ok" and r["floor_fraction"] else None
    add("RBF HSIC n=65536: time / GEMM floor (2 n^2 (dx+dy) flops) <= 1.5", 1 / frac if frac else None,
        lambda x: x <= 1.5, why=(r or {}).get("status", "no row"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", nargs="?", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    print("| target | measured | met |\n|---|---|---|")
    for t, v, ok in evaluate(Path(args.dir), args.device):
        print(f"| {t} | {v} | {ok} |")


if __name__ == "__main__":
    main()
