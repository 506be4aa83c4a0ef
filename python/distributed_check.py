"""End-to-end check of `sdft recover` / `sdft align` under torchrun against one process, on CPU (gloo).

Builds a tiny random teacher, degrades it (4-bit RTN), then runs the real CLI:
  1. recover on 1 process (the reference), on 2 ranks with --strategy ddp and with --strategy fsdp;
  2. a 2-rank FSDP run SIGKILLed when its first checkpoint lands, resumed on 1 process;
  3. a 1-process run killed the same way, resumed on 2 DDP ranks;
  4. align on 1 process and on 2 ranks.
and prints the largest weight / CKA difference of each against the reference. Takes a few minutes
on a 2-core CPU.    Usage: python python/distributed_check.py [--workdir DIR] [--nproc 2]
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
CLI = [PY, "-m", "sdft_kernels.cli"]
TRAIN = ["--steps", "12", "--batch-size", "8", "--block-len", "64", "--max-blocks", "32",
         "--checkpoint-every", "4", "--align-blocks", "0", "--lr", "1e-3"]


def torchrun(nproc, port):
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "sdft_kernels.cli"]


def run(cmd, log):
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"failed ({rc}): {' '.join(map(str, cmd))}; see {log}")


def _descendants(pid):
    # torchrun starts its workers in sessions of their own: killing its process group misses them
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out += [int(d)] + _descendants(int(d))
    return out


def run_until(cmd, watch, log):
    """Run cmd; SIGKILL it and all its descendants as soon as `watch` exists (a crash, not an exit)."""
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        while p.poll() is None and not watch.exists():
            time.sleep(0.01)
        if p.poll() is not None:
            sys.exit(f"{' '.join(map(str, cmd))} ended before {watch} appeared; see {log}")
        for pid in _descendants(p.pid):
            os.kill(pid, signal.SIGKILL)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def max_weight_diff(a, b):
    """Largest weight difference between the recovered models of runs a and b (or model dirs)."""
    from safetensors.torch import load_file
    a, b = (d / "model" if (d / "model").is_dir() else d for d in (a, b))
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max((x[k] - y[k]).abs().max().item() for k in x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sdft-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    n = args.nproc

    from sdft_kernels.models import tiny_random_model
    model, tok = tiny_random_model(num_layers=2, hidden_size=32, seed=0)
    model.save_pretrained(work / "teacher")
    tok.save_pretrained(work / "teacher")
    run(CLI + ["degrade", "--model", work / "teacher", "--spec", "rtn:4:g16", "--out", work / "student"],
        work / "degrade.log")
    pair = ["--teacher", work / "teacher", "--student", work / "student"]

    for d in ("ref", f"ddp{n}", f"fsdp{n}", f"fsdp{n}_killed_resumed1", f"one_killed_resumed{n}"):
        (work / d).mkdir(exist_ok=True)
    ref = work / "ref"
    run(CLI + ["recover", *pair, *TRAIN, "--out", ref], work / "ref.log")
    rows = []
    for strategy, port in (("ddp", 29631), ("fsdp", 29632)):
        out = work / f"{strategy}{n}"
        run(torchrun(n, port) + ["recover", *pair, *TRAIN, "--out", out, "--strategy", strategy], work / f"{out.name}.log")
        rows.append((f"recover, {n} ranks, {strategy}", max_weight_diff(ref, out)))

    out = work / f"fsdp{n}_killed_resumed1"
    run_until(torchrun(n, 29633) + ["recover", *pair, *TRAIN, "--out", out, "--strategy", "fsdp"],
              out / "checkpoint.pt", work / f"{out.name}.a.log")
    run(CLI + ["recover", *pair, *TRAIN, "--out", out, "--strategy", "fsdp"], work / f"{out.name}.b.log")
    rows.append((f"fsdp {n} ranks killed at step 4, resumed on 1", max_weight_diff(ref, out)))

    out = work / f"one_killed_resumed{n}"
    run_until(CLI + ["recover", *pair, *TRAIN, "--out", out], out / "checkpoint.pt", work / f"{out.name}.a.log")
    run(torchrun(n, 29634) + ["recover", *pair, *TRAIN, "--out", out], work / f"{out.name}.b.log")
    rows.append((f"1 process killed at step 4, resumed on {n} ddp ranks", max_weight_diff(ref, out)))

    al = ["align", "--teacher", work / "teacher", "--student", ref / "model", "--blocks", "4", "--block-len",
          "128", "--chunk", "64"]
    run(CLI + al + ["--out", work / "align1.json"], work / "align1.log")
    run(torchrun(n, 29635) + al + ["--out", work / f"align{n}.json"], work / f"align{n}.log")
    a = json.loads((work / "align1.json").read_text())
    b = json.loads((work / f"align{n}.json").read_text())
    rows.append((f"align, {n} ranks: per-layer CKA", max(abs(x - y) for x, y in zip(a["cka"], b["cka"]))))
    moved = max_weight_diff(ref, work / "student")

    print(f"\nworkdir: {work}\nreference: 1 process; SDFT moved the weights by up to {moved:.3g}")
    print(f"{'run':55s} max |diff| vs 1 process")
    for name, d in rows:
        print(f"{name:55s} {d:.3g}")


if __name__ == "__main__":
    main()
