"""PNG plots of a study (matplotlib, Agg backend, written atomically).

- heatmap_<run>.png      minibatch CKA, teacher blocks x student blocks, before | after recovery
- cka_per_layer.png      linear CKA of each matched block, before vs after, one panel per run
- cka_trajectory.png     mean CKA at every SDFT checkpoint, and the SDFT loss over steps
- recovery_vs_cka.png    perplexity recovery ratio vs CKA after recovery, with the fitted line and r
"""
from __future__ import annotations

import io
import math
from pathlib import Path

from . import io as sio


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    sio.atomic_write_bytes(path, buf.getvalue())


def heatmap(path: Path, before, after, title: str) -> None:
    """after may be None (one panel). before/after: [student layers][teacher layers] lists; drawn teacher on x, student on y."""
    plt = _plt()
    mats = [(before, "degraded"), (after, "recovered")] if after is not None else [(before, "student")]
    fig, axes = plt.subplots(1, len(mats), figsize=(4.5 * len(mats), 4), squeeze=False)
    axes = list(axes.flat)
    for ax, (mat, sub) in zip(axes, mats):
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xlabel("teacher block")
        ax.set_ylabel("student block")
        ax.set_title(f"{sub}")
    fig.colorbar(im, ax=axes, shrink=0.8, label="minibatch CKA")
    fig.suptitle(title)
    _save(fig, path)


def per_layer(path: Path, results) -> None:
    plt = _plt()
    n = len(results)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax, r in zip(axes.flat, results):
        b, a = r["before"]["align"], r["after"]["align"]
        # an undefined CKA (NaN; null once read back from JSON) is a gap in the line
        cb, ca = ([float("nan") if c is None else c for c in al["cka"]] for al in (b, a))
        ax.plot(b["layer_map"], cb, "o-", label="degraded")
        ax.plot(a["layer_map"], ca, "s-", label="recovered")
        ax.set_ylim(min([0.0] + [c for c in cb + ca if math.isfinite(c)]), 1.02)
        ax.set_title(r["spec"], fontsize=9)
        ax.set_xlabel("teacher block")
        ax.set_ylabel("linear CKA")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def trajectories(path: Path, results) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results:
        tr = r["trajectory"]
        if tr:
            ax1.plot([p["step"] for p in tr], [p["mean_cka"] for p in tr], "o-", label=r["spec"])
        h = r["history"]
        if h:
            ax2.plot([p["step"] for p in h], [p["loss"] for p in h], label=r["spec"])
    ax1.set_xlabel("SDFT step")
    ax1.set_ylabel("mean CKA to teacher")
    ax1.set_title("CKA trajectory")
    ax2.set_xlabel("SDFT step")
    ax2.set_ylabel("distillation loss")
    ax2.set_yscale("log")
    ax2.set_title("SDFT loss")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def scatter(path: Path, metrics) -> bool:
    import numpy as np
    keys = ("cka_after", "cka_before")
    ok = lambda v: v is not None and np.isfinite(v)  # noqa: E731  (an undefined CKA is left out)
    rows = [r for r in metrics["runs"] if ok(r["recovery_ppl"]) and all(ok(r[k]) for k in keys)]
    if len(rows) < 2:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], keys[0], "mean CKA after SDFT"),
                           (axes[1], keys[1], "mean CKA before SDFT (degraded)")):
        x = np.array([r[key] for r in rows])
        y = np.array([r["recovery_ppl"] for r in rows])
        ax.scatter(x, y)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(r["spec"], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        c = metrics["correlation"].get(f"recovery_ppl~{key}", {})
        if len(set(x.tolist())) > 1:
            k, b0 = np.polyfit(x, y, 1)
            xs = np.linspace(x.min(), x.max(), 50)
            ax.plot(xs, k * xs + b0, "--", color="gray")
        r_txt = f"Pearson r={c['pearson_r']:.2f} (p={c['pearson_p']:.2g})" if c.get("pearson_r") is not None else ""
        ax.set_title(r_txt, fontsize=9)
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity recovery ratio")
    fig.tight_layout()
    _save(fig, path)
    return True


def write_all(out: Path, teacher, results, metrics) -> list[str]:
    """Every plot of the study; returns the file names written (relative to out)."""
    out = Path(out)
    names = []
    for r in results:
        hb, ha = r["before"]["align"].get("heatmap"), r["after"]["align"].get("heatmap")
        if hb is not None and ha is not None:
            name = f"heatmap_{r['name']}.png"
            heatmap(out / name, hb, ha, f"{r['spec']}: CKA teacher x student")
            names.append(name)
    if results:
        per_layer(out / "cka_per_layer.png", results)
        trajectories(out / "cka_trajectory.png", results)
        names += ["cka_per_layer.png", "cka_trajectory.png"]
    if scatter(out / "recovery_vs_cka.png", metrics):
        names.append("recovery_vs_cka.png")
    return names
