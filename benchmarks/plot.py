"""Log-axis plots of cost growth from the CSVs: time and peak memory against each swept size.

For every kernel CSV and every size that varies (N, V, n, d, L) while the others stay fixed, one PNG
with two panels (median time with the p20-p80 band; peak memory beyond the inputs), one line per
provider, from the latest row of each (provider, sizes, dtype, device). Run: python -m benchmarks.plot [DIR]
"""
from __future__ import annotations

import csv
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

SWEEP_KEYS = ("N", "V", "n", "d", "L")


def _parse_sizes(s):
    out = {}
    for part in s.split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = v
    return out


def latest_rows(path: Path):
    """Latest ok row per (provider, mode, sizes, dtype, device, metric)."""
    best = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if not r.get("status", "").startswith("ok") or r["median"] in ("", None):
                continue
            key = (r["provider"], r["mode"], r["sizes"], r["dtype"], r["device"], r["metric"])
            if key not in best or r["timestamp"] >= best[key]["timestamp"]:
                best[key] = r
    return list(best.values())


def _short_device(name):
    return "cuda" if any(w in name for w in ("NVIDIA", "H100", "H200", "A100")) else "cpu"


def plot_csv(path: Path, out_dir: Path) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = latest_rows(path)
    kernel = path.stem
    written = []
    for var in SWEEP_KEYS:
        # group: (fixed sizes without var, dtype, device, mode) -> provider -> metric -> [(x, row)]
        groups = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        for r in rows:
            sz = _parse_sizes(r["sizes"])
            if var not in sz:
                continue
            fixed = tuple(sorted((k, v) for k, v in sz.items() if k != var))
            g = (fixed, r["dtype"], _short_device(r["device"]), r["mode"])
            groups[g][r["provider"]][r["metric"]].append((float(sz[var]), r))
        for (fixed, dtype, dev, mode), provs in groups.items():
            xs_all = {x for p in provs.values() for x, _ in p.get("time", [])}
            if len(xs_all) < 2 or not any(len(p.get("time", [])) >= 2 for p in provs.values()):
                continue
            fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
            for prov, metrics in sorted(provs.items()):
                t = sorted(metrics.get("time", []), key=lambda z: z[0])
                if t:
                    x = [a for a, _ in t]
                    axes[0].plot(x, [float(r["median"]) for _, r in t], marker="o", label=prov)
                    axes[0].fill_between(x, [float(r["p20"]) for _, r in t], [float(r["p80"]) for _, r in t],
                                         alpha=0.2)
                m = sorted(metrics.get("peak_mem", []), key=lambda z: z[0])
                if m:
                    axes[1].plot([a for a, _ in m], [max(float(r["median"]), 0.1) for _, r in m], marker="o",
                                 label=prov)
            title = ", ".join(f"{k}={v}" for k, v in fixed)
            for ax, ylabel in zip(axes, ("median time [s]", "peak memory beyond inputs [MiB]")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(var)
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
            axes[0].legend(fontsize=8)
            fig.suptitle(f"{kernel} ({mode}, {dtype}, {dev}) vs {var}; {title}", fontsize=9)
            fig.tight_layout()
            tag = "_".join(f"{k}{v}" for k, v in fixed if k in SWEEP_KEYS)
            name = f"{kernel}_{var}_{dtype}_{dev}" + (f"_{tag}" if tag else "") + ".png"
            fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".png")
            os.close(fd)
            fig.savefig(tmp, dpi=110)
            plt.close(fig)
            os.replace(tmp, out_dir / name)
            written.append(out_dir / name)
    return written


def plot_dir(out_dir, kernels=None) -> list:
    out_dir = Path(out_dir)
    written = []
    for path in sorted(out_dir.glob("*.csv")):
        if path.stem == "floors" or (kernels and path.stem not in kernels):
            continue
        written += plot_csv(path, out_dir)
    return written


if __name__ == "__main__":
    d = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"
    for p in plot_dir(d):
        print(p)
