"""`sdft bench [distill|cka|all]`: our kernels and every installed peer on the same inputs, one table.

Prints one line per case (provider, sizes, median time, peak memory beyond the inputs, fraction of the
hardware floor measured in the same run), appends rows to <out>/<kernel>.csv and draws log-axis PNGs.
The harness lives in the repository's benchmarks/ package (a source checkout, installed editable).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def configure(parser):
    parser.add_argument("which", nargs="?", default="all", choices=["distill", "cka", "all"],
                        help="which kernel family to benchmark (default: all)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, few repetitions (under 2 minutes on a 2-core CPU)")
    parser.add_argument("--out", default=None,
                        help="directory for CSV + PNG (default: benchmarks/results, or ./sdft-bench-quick "
                             "with --quick so quick rows never mix with the recorded ones)")
    parser.add_argument("--budget", type=float, default=None,
                        help="timing budget per case in seconds after warm-up (default 0.5 quick, 2 full)")
    parser.add_argument("--providers", default=None,
                        help="comma-separated providers to run (e.g. ours,naive); default: all")
    parser.add_argument("--kernels", default=None,
                        help="comma-separated kernels to run (e.g. distill_loss,kernel_hsic); default: all")
    parser.add_argument("--match", default=None,
                        help="only cases whose sizes contain every comma-separated piece (e.g. n=65536)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds from the start after which no new case starts (those left are "
                             "recorded as skipped), so a time-limited run still ends with its table")


def _import_benchmarks():
    if not (REPO / "benchmarks" / "harness.py").exists():
        raise SystemExit("sdft bench needs the source checkout's benchmarks/ directory "
                         "(install with `pip install -e .[bench]` from a clone)")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import benchmarks.harness as harness
    from benchmarks import bench_cka, bench_distill, floors
    return harness, floors, bench_distill, bench_cka


def main(args) -> int:
    import torch

    harness, floors, bench_distill, bench_cka = _import_benchmarks()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (Path("sdft-bench-quick") if args.quick else harness.RESULTS_DIR)
    st = harness.Settings(device=device, quick=args.quick, out_dir=out,
                          budget_s=args.budget if args.budget is not None else (0.3 if args.quick else 2.0),
                          min_reps=2 if args.quick else 3, max_reps=10 if args.quick else 20)
    bench_distill.setup_env()
    t0 = time.perf_counter()
    env = harness.environment(device)
    print(f"sdft bench {args.which} on {env['device']}, torch {env['torch']}, commit {env['commit']}, "
          f"{torch.get_num_threads()} threads{', quick' if args.quick else ''}; writing {out}/")
    floors.measure_floors(st)
    families = {"distill": bench_distill, "cka": bench_cka}
    rows = []
    for name in (["distill", "cka"] if args.which == "all" else [args.which]):
        mod = families[name]
        by_kernel = {}
        want_p = set(args.providers.split(",")) if args.providers else None
        want_k = set(args.kernels.split(",")) if args.kernels else None
        for case in mod.cases(device, args.quick):
            if (want_p and case.provider not in want_p) or (want_k and case.kernel not in want_k):
                continue
            if args.match and not all(m in case.sizes_str.split(",") for m in args.match.split(",")):
                continue
            by_kernel.setdefault(case.kernel, []).append(case)
        for kernel, cases in by_kernel.items():
            rows += harness.run_cases(cases, st, kernel, log=lambda line: print(line, flush=True),
                                      deadline=None if args.deadline is None else t0 + args.deadline)
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        _print_table(harness, [r for r in rows if r["kernel"] == kernel])
    if not args.no_plots:
        from benchmarks.plot import plot_dir
        pngs = plot_dir(out, kernels={r["kernel"] for r in rows})
        print(f"plots: {len(pngs)} PNG(s) in {out}/")
    print(f"done in {time.perf_counter() - t0:.0f} s; rows appended to {out}/<kernel>.csv")
    return 0


def _print_table(harness, rows):
    """Compact table: one line per case."""
    cases = {}
    for r in rows:
        cases.setdefault((r["provider"], r["mode"], r["sizes"], r["dtype"]), []).append(r)
    print()
    print(f"{'kernel':<22} {'provider':<26} {'mode':<8} {'dtype':<8} {'sizes':<34} {'median':>13}  "
          f"{'peak mem':>12}  {'of floor':>10}")
    for case_rows in cases.values():
        print(harness.format_case(case_rows))
    sys.stdout.flush()


if __name__ == "__main__":   # `python -m sdft_kernels.bench ...` (no other command module imported)
    import argparse
    _p = argparse.ArgumentParser(prog="python -m sdft_kernels.bench", description=__doc__.splitlines()[0])
    configure(_p)
    sys.exit(main(_p.parse_args()))
