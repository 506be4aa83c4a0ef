"""Markdown tables from the CSVs (for the README), so published numbers are the recorded ones.

python -m benchmarks.tables [DIR] [--device cpu|cuda]: for each kernel, the latest row of every case:
provider, sizes, dtype, median time (p20-p80), peak memory beyond the inputs, floor fraction, extras
(error vs float64, compile time), status, plus the commit/machine/load the rows were measured with.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path


def _latest(path: Path, device: str):
    """Latest row per (provider, mode, sizes, dtype, metric), keeping file order of first appearance."""
    best, order = {}, []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            is_gpu = any(w in r["device"] for w in ("NVIDIA", "H100", "H200", "A100"))
            if (device == "cuda") != is_gpu:
                continue
            case = (r["provider"], r["mode"], r["sizes"], r["dtype"])
            if case not in order:
                order.append(case)
            best[case + (r["metric"],)] = r
    return order, best


def _fmt_time(s):
    s = float(s)
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def kernel_table(path: Path, device: str = "cpu") -> str:
    order, best = _latest(path, device)
    if not order:
        return ""
    lines = [f"**{path.stem}**", "",
             "| provider | sizes | dtype | median (p20-p80) | peak mem beyond inputs | of floor | notes |",
             "|---|---|---|---|---|---|---|"]
    meta = set()
    for case in order:
        t = best.get(case + ("time",))
        if t is None:
            continue
        meta.add((t["commit"], t["device"], t["torch"]))
        if t["status"] != "ok":
            lines.append(f"| {case[0]} | {case[2]} | {case[3]} | - | - | - | {t['status']} |")
            continue
        mem = best.get(case + ("peak_mem",))
        notes = []
        for metric in ("max_abs_err", "rel_err", "compile_time", "rate"):
            r = best.get(case + (metric,))
            if r:
                notes.append(f"{metric} {r['median']}" + {"compile_time": " s", "rate": " " + r["unit"]}.get(metric, ""))
        notes.append(f"reps {t['reps']}, load {t['load1']}, commit {t['commit']}")
        frac = f"{float(t['floor_fraction']):.0%} ({t['floor']})" if t["floor_fraction"] else ""
        lines.append(f"| {case[0]} | {case[2]} | {case[3]} | {_fmt_time(t['median'])} "
                     f"({_fmt_time(t['p20'])}-{_fmt_time(t['p80'])}) | "
                     f"{mem['median'] + ' MiB' if mem else ''} | {frac} | {'; '.join(notes)} |")
    lines.append("")
    for commit, dev, torch_v in sorted(meta):
        lines.append(f"_measured at commit {commit} on {dev}, torch {torch_v}_")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", nargs="?", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    for path in sorted(Path(args.dir).glob("*.csv")):
        table = kernel_table(path, args.device)
        if table:
            print(table)


if __name__ == "__main__":
    main()
