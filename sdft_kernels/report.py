"""Study outputs: metrics.json / metrics.csv, the plots, and report.md (what a person reads first).

Recovery ratio = (recovered - degraded) / (original - degraded) per metric (1 = fully recovered,
0 = no change, < 0 = worse). It is only meaningful when the degradation moved the metric, so runs
whose degradation changed it by less than `MIN_GAP` (relative) are reported as "not degraded" and
left out of the correlations instead of producing a huge or undefined ratio.
"""
from __future__ import annotations

from pathlib import Path

from . import io as sio

MIN_GAP = 0.02  # relative change a degradation must cause before its recovery ratio is meaningful


def _ratio(orig, deg, rec, higher_is_better):
    from .evaluate import recovery_ratio
    if orig is None or deg is None or rec is None:
        return None
    gap = (orig - deg) if higher_is_better else (deg - orig)
    if gap <= MIN_GAP * max(abs(orig), 1e-12):
        return None
    return float(recovery_ratio(orig, deg, rec))


def _num(v):
    """A finite float, or None: an undefined CKA (zero-variance layer, too few tokens) is NaN in memory
    and null once a unit's JSON is read back, and must read the same both ways."""
    import math
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _diff(a, b):
    a, b = _num(a), _num(b)
    return None if a is None or b is None else a - b


def _min(values):
    vals = [_num(v) for v in values]
    return None if not vals or any(v is None for v in vals) else min(vals)


def summarize(teacher: dict, results: list[dict]) -> dict:
    """Per-run rows and alignment-vs-recovery correlations across runs. Undefined values (NaN / None)
    show as None and are left out of the correlations."""
    from .evaluate import correlate
    t_ppl, t_acc = teacher["eval"]["perplexity"], teacher["eval"]["task_accuracy"]
    rows = []
    for r in results:
        b, a = r["before"], r["after"]
        row = {
            "run": r["name"], "family": r["family"], "spec": r["spec"],
            "ppl_original": t_ppl, "ppl_degraded": b["eval"]["perplexity"], "ppl_recovered": a["eval"]["perplexity"],
            "acc_original": t_acc, "acc_degraded": b["eval"]["task_accuracy"],
            "acc_recovered": a["eval"]["task_accuracy"],
            "recovery_ppl": _ratio(t_ppl, b["eval"]["perplexity"], a["eval"]["perplexity"], False),
            "recovery_acc": _ratio(t_acc, b["eval"]["task_accuracy"], a["eval"]["task_accuracy"], True),
            "cka_before": _num(b["align"]["mean_cka"]), "cka_after": _num(a["align"]["mean_cka"]),
            "cka_gain": _diff(a["align"]["mean_cka"], b["align"]["mean_cka"]),
            "min_cka_before": _min(b["align"]["cka"]), "min_cka_after": _min(a["align"]["cka"]),
            "kl_before": b["kl_to_teacher"], "kl_after": a["kl_to_teacher"],
            "sdft_steps": len(r["history"]), "recover_seconds": r["recover_seconds"],
        }
        rows.append(row)
    corr = {}
    usable = [(row, r) for row, r in zip(rows, results) if row["recovery_ppl"] is not None]
    y = [row["recovery_ppl"] for row, _ in usable]
    if len(usable) >= 3:
        for key in ("cka_after", "cka_before", "cka_gain", "min_cka_after"):
            corr[f"recovery_ppl~{key}"] = _corr([row[key] for row, _ in usable], y, correlate)
        # per teacher layer: CKA after recovery of the student block mapped onto that teacher block
        n_t = teacher["n_layers"]
        per_layer = []
        for j in range(n_t):
            xs, ys = [], []
            for row, r in usable:
                al = r["after"]["align"]
                cs = [_num(c) for c, tj in zip(al["cka"], al["layer_map"]) if tj == j]
                if cs and cs[0] is not None:
                    xs.append(cs[0])
                    ys.append(row["recovery_ppl"])
            per_layer.append({"teacher_layer": j, "n": len(xs),
                              **(_corr(xs, ys, correlate) if len(xs) >= 3 else {})})
        corr["recovery_ppl~cka_after_per_layer"] = per_layer
    # KL-to-teacher is a recovery measure that does not need a perplexity gap: correlate it too
    if len(results) >= 3:
        corr["kl_after~cka_after"] = _corr([r["cka_after"] for r in rows], [r["kl_after"] for r in rows], correlate)
    return {"teacher": teacher, "runs": rows, "correlation": corr, "n_runs": len(rows),
            "n_runs_in_correlation": len(usable)}


def _corr(x, y, correlate) -> dict:
    import math
    pairs = [(a, b) for a, b in zip(x, y) if _num(a) is not None and _num(b) is not None]
    if len(pairs) < 3:
        return {"n": len(pairs), "note": "fewer than 3 runs with defined values: correlation undefined"}
    x, y = [a for a, _ in pairs], [b for _, b in pairs]
    if len(set(x)) < 2 or len(set(y)) < 2:
        return {"n": len(x), "note": "constant input: correlation undefined"}
    c = {k: float(v) for k, v in correlate(x, y).items()}
    c = {k: (v if math.isfinite(v) else None) for k, v in c.items()}
    c["n"] = len(x)
    return c


def write_outputs(out: Path, cfg: dict, teacher: dict, results: list[dict], metrics: dict) -> None:
    from . import plots
    out = Path(out)
    sio.atomic_write_json(out / "metrics.json", metrics)
    sio.atomic_write_csv(out / "metrics.csv", metrics["runs"])
    figs = plots.write_all(out, teacher, results, metrics)
    sio.atomic_write_text(out / "report.md", render_report(cfg, teacher, results, metrics, figs))


def show(v, fmt="{:.3f}"):
    """v formatted, or "n/a" when it is undefined (None / NaN)."""
    return "n/a" if _num(v) is None else fmt.format(v)


def render_report(cfg: dict, teacher: dict, results: list[dict], metrics: dict, figs: list[str]) -> str:
    t = teacher
    L = []
    L.append("# SDFT study report\n")
    L.append(f"Model: `{cfg.get('model') or 'embedded default model'}` ({t['n_layers']} decoder layers, "
             f"{t['n_params'] / 1e6:.2f} M parameters). Teacher = the original model; student = its degraded "
             f"copy, recovered by SDFT ({cfg['recover']['divergence']}, {cfg['recover']['steps']} steps x "
             f"{cfg['recover']['batch_size']} blocks of {cfg['block_len']} tokens, lr {cfg['recover']['lr']})"
             + (f"; run on {metrics['device']}" if metrics.get("device") else "") + ".\n")
    L.append(f"Original model: held-out perplexity **{t['eval']['perplexity']:.2f}**, narrow-task accuracy "
             f"**{t['eval']['task_accuracy']:.3f}**. Teacher-vs-itself CKA: "
             f"{min(t['self_cka']):.4f}..{max(t['self_cka']):.4f} (sanity check, should be 1).\n")
    o = t["align_overhead"]
    L.append(f"Alignment overhead on one {o['tokens']}-token sequence (chunks of {o['chunk_len']}): "
             f"{o['align_s']:.2f} s with hooks + CKA vs {o['forward_s']:.2f} s for the two forwards alone: "
             f"**{100 * o['overhead']:.0f}%** on top (target < 30%).\n")
    L.append("Recovery ratio = (recovered - degraded) / (original - degraded): 1 = all of the loss recovered. "
             f"'n/a' = the degradation changed the metric by less than {100 * MIN_GAP:.0f}%.\n")
    by_family: dict = {}
    for row in metrics["runs"]:
        by_family.setdefault(row["family"], []).append(row)
    for fam, rows in by_family.items():
        L.append(f"\n## {fam.capitalize()}\n")
        L.append("| run | ppl degraded | ppl recovered | recovery (ppl) | acc degraded | acc recovered | "
                 "recovery (acc) | CKA before | CKA after | KL before | KL after |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            L.append(f"| {r['spec']} | {show(r['ppl_degraded'], '{:.2f}')} | {show(r['ppl_recovered'], '{:.2f}')} | "
                     f"{show(r['recovery_ppl'], '{:.2f}')} | {show(r['acc_degraded'])} | {show(r['acc_recovered'])} | "
                     f"{show(r['recovery_acc'], '{:.2f}')} | {show(r['cka_before'])} | {show(r['cka_after'])} | "
                     f"{show(r['kl_before'], '{:.4f}')} | {show(r['kl_after'], '{:.4f}')} |")
    L.append("\n## Alignment vs recovery across runs\n")
    corr = metrics["correlation"]
    if not any(k.startswith("recovery_ppl~") for k in corr):
        L.append(f"Only {metrics['n_runs_in_correlation']} run(s) with a measurable perplexity loss: "
                 "too few (need 3) for a correlation.\n")
    for k, c in corr.items():
        if isinstance(c, dict) and "pearson_r" in c:
            L.append(f"- {k}: Pearson r = {show(c.get('pearson_r'))} (p = {show(c.get('pearson_p'), '{:.3g}')}), "
                     f"Spearman rho = {show(c.get('spearman_r'))} (p = {show(c.get('spearman_p'), '{:.3g}')}), n = {c['n']}")
        elif isinstance(c, dict) and "note" in c:
            L.append(f"- {k}: {c['note']}")
    L.append("\n## Remarks\n")
    L.extend(_remarks(metrics, results))
    if figs:
        L.append("\n## Plots\n")
        L.extend(f"- [{f}]({f})" for f in figs)
    L.append("\nFull numbers: `metrics.json`, `metrics.csv`; per-run details, SDFT loss curves and CKA "
             "trajectories: `units/<run>/result.json`.\n")
    return "\n".join(L) + "\n"


def _remarks(metrics: dict, results: list[dict]) -> list[str]:
    """Honest, data-driven remarks: where recovery failed, where CKA did not move."""
    out = []
    for row, r in zip(metrics["runs"], results):
        rp = row["recovery_ppl"]
        if rp is None:
            out.append(f"- {row['spec']}: perplexity barely moved under this degradation "
                       f"({row['ppl_original']:.2f} -> {row['ppl_degraded']:.2f}); nothing to recover.")
        elif rp < 0:
            out.append(f"- {row['spec']}: SDFT made perplexity WORSE (ratio {rp:.2f}).")
        elif rp < 0.5:
            out.append(f"- {row['spec']}: SDFT recovered only {100 * rp:.0f}% of the lost perplexity in "
                       f"{row['sdft_steps']} steps.")
        else:
            out.append(f"- {row['spec']}: SDFT recovered {100 * rp:.0f}% of the lost perplexity.")
        if row["kl_after"] >= row["kl_before"]:
            out.append(f"  SDFT did not reduce the held-out KL to the teacher ({row['kl_before']:.4f} -> "
                       f"{row['kl_after']:.4f}): more steps or a lower learning rate are needed.")
        elif row["cka_after"] is None or row["cka_before"] is None:
            out.append("  Mean CKA is undefined for this run (a zero-variance layer or too few tokens).")
        elif row["cka_after"] < row["cka_before"]:
            out.append(f"  CKA went down ({row['cka_before']:.3f} -> {row['cka_after']:.3f}) although SDFT "
                       "reduced the KL: the alignment did not follow the recovery here.")
        ra = row["recovery_acc"]
        if row["family"] == "forgetting" and row["acc_degraded"] > row["acc_original"]:
            out.append(f"  (Forgetting SFT raised task accuracy {row['acc_original']:.3f} -> {row['acc_degraded']:.3f}; "
                       f"SDFT toward the original model moves it to {row['acc_recovered']:.3f}.)")
        elif ra is not None and ra < 0.5:
            out.append(f"  Task accuracy recovered only {100 * ra:.0f}%.")
        sk = r.get("structure_kept", {})
        if r["kind"].startswith("quantize") and not sk.get("quant_layers"):
            out.append("  WARNING: the recovered model lost its quantized layers.")
    return out
