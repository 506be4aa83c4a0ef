"""Does tests/test_cuda_emulated.py catch real kernel bugs? Plants each bug below, one at a time, in a
copy of csrc/ (the working tree is never touched), rebuilds the emulated kernels (only the changed file
recompiles) and runs the emulated tests, which must fail. Run by hand after changing a CUDA kernel:

    python tests/cuda_emu/mutate.py            # all; or name some: ... mutate.py cluster_wait topk_bad_or

A mutation whose text no longer occurs in the kernel is reported as stale (update or drop it). One
entry is known to be equivalent (changes nothing observable) and is expected to survive.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# name: (file under csrc/, text, replacement, expected to survive)
MUTATIONS = {
    "block_sum_first_barrier": ("cuda/distill_block.cuh",
                                "  __syncthreads();  // red may still be read by a previous reduction\n", "", False),
    "block_lse_first_barrier": ("cuda/distill_block.cuh",
                                "  __syncthreads();\n  if (lane == 0) {\n    red[2 * warp] = m;",
                                "  if (lane == 0) {\n    red[2 * warp] = m;", False),
    "inplace_write_ahead": ("cuda/distill_block.cuh",
                            "if (GRAD && DIV == kForwardKL) g[j] =",
                            "if (GRAD && DIV == kForwardKL && j + 1 < n) g[j + 1] =", False),
    "cluster_parts_read_barrier": ("cuda/distill_cluster.cuh",
                                   "  cluster.sync();  // every block has read every part: they may be rewritten\n",
                                   "", False),
    "cluster_exit_barrier": ("cuda/distill_cluster.cuh",
                             "  cluster.sync();  // reads done before any block exits", "  //", False),
    "cluster_last_slice": ("cuda/distill_cluster.cuh", "n = lo < V ? (V - lo < slice ? V - lo : slice) : 0;",
                           "n = lo < V ? slice : 0;", False),
    "cluster_copy_wait": ("cuda/distill_cluster.cuh", "  cg::wait(block);", "  block.sync();", False),
    "topk_bad_not_reduced": ("cuda/distill_topk.cu", "  bad = __syncthreads_or(bad);", "  __syncthreads();", False),
    "topk_tail_past_end": ("cuda/distill_topk.cu",
                           "  for (int64_t j = tid; j < V; j += kBlock)\n    if (!(bitmap[j / 32] & (1u << (j % 32))))\n      g[j]",
                           "  for (int64_t j = tid; j <= V; j += kBlock)\n    if (!(bitmap[j / 32] & (1u << (j % 32))))\n      g[j]",
                           False),
    "lanes_sum_barrier": ("cuda/cka_columns.cu", "  sh[threadIdx.y][threadIdx.x] = v;\n  __syncthreads();",
                          "  sh[threadIdx.y][threadIdx.x] = v;", False),
    "column_max_barrier": ("cuda/cka_columns.cu",
                           "shm[t + half] : shm[t];\n    __syncthreads();", "shm[t + half] : shm[t];", False),
    "shift_partial_past_end": ("cuda/cka_columns.cu",
                               "  if (threadIdx.y == 0 && j < d) partial[blockIdx.y * d + j] = total;\n}\n\n}",
                               "  if (threadIdx.y == 0 && j <= d) partial[blockIdx.y * d + j] = total;\n}\n\n}",
                               False),
    "column_stats_partial_before_start": ("cuda/cka_columns.cu",
                                          "partial[blockIdx.y * d + j] = total;\n  const int t",
                                          "partial[blockIdx.y * d + j - 1] = total;\n  const int t", False),
    "ucentre_upper_mirror": ("cuda/cka_moments.cu", "(upper && j < i) ? k[j * b + i] : k[i * b + j]",
                             "k[i * b + j]", False),
    # equivalent: each block_sum there is the kernel's last use of its shared array
    "moments_block_sum_last_barrier": ("cuda/cka_moments.cu",
                                       "s += shared[k];\n  __syncthreads();", "s += shared[k];", True),
}


def main(names):
    work = Path(tempfile.mkdtemp(prefix="sdft_mutants_"))
    env = dict(os.environ, SDFT_EMU_CSRC=str(work / "csrc"), SDFT_EMU_BUILD=str(ROOT / "build" / "cuda_emu_mutant"))
    bad = 0
    try:
        for name in names or MUTATIONS:
            rel, old, new, survives = MUTATIONS[name]
            shutil.rmtree(work / "csrc", ignore_errors=True)
            shutil.copytree(ROOT / "csrc", work / "csrc")
            path = work / "csrc" / rel
            text = path.read_text()
            if text.count(old) != 1:
                print(f"{name}: STALE (the text to mutate occurs {text.count(old)} times in {rel})")
                bad += 1
                continue
            path.write_text(text.replace(old, new))
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                str(ROOT / "tests" / "test_cuda_emulated.py")], env=env, cwd=ROOT,
                               capture_output=True, text=True)
            first = next((ln for ln in r.stdout.splitlines() if ln.startswith("E ")), "")
            if "Error building extension" in r.stdout or "returned non-zero exit status" in first:
                print(f"{name}: BUILD FAILED (the mutation is not valid C++; fix it)")
                bad += 1
                continue
            caught = r.returncode != 0
            verdict = "caught" if caught else "SURVIVED"
            if caught == survives:
                bad += 1
                verdict += " (unexpected)"
            print(f"{name}: {verdict} (rc {r.returncode}) {first[:160]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
