#!/usr/bin/env bash
# One call on a fresh GPU machine (torch + nvcc + ninja + pytest installed, no network):
#   1. build the extension with CUDA for the card in hand (TORCH_CUDA_ARCH_LIST=9.0 for H100/H200,
#      MAX_JOBS = cores), against that machine's own torch;
#   2. run the CUDA tests (pytest -m cuda), one-line summary;
#   3. run the GPU benchmarks (ours vs naive PyTorch, torch.compile, torchtune / Liger-Kernel when
#      installed), CSV rows + PNGs into $OUT (or ./gpu-results);
#   4. print a compact table last.
# Usage: bash benchmarks/gpu_check.sh [--quick]     (env: OUT, TORCH_CUDA_ARCH_LIST, MAX_JOBS, PYTHON,
#        GPU_CHECK_SKIP_BUILD=1 to reuse an in-place build, GPU_CHECK_BENCH=distill|cka|all,
#        GPU_CHECK_SECONDS=540: the whole call's time; no benchmark case starts after it, so a call under
#        a 10-minute device limit still ends with its table and CSVs instead of being killed mid-run;
#        GPU_CHECK_TEST_SECONDS=180 bounds the CUDA tests)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$ROOT/gpu-results}
mkdir -p "$OUTDIR"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
QUICK=${1:-}
t0=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - t0 ))s] $*"; }

say "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi unavailable')"
$PY - <<'PY' || { echo "gpu_check: torch sees no CUDA device"; exit 2; }
import torch, sys
print(f"torch {torch.__version__} cuda {torch.version.cuda} device_count {torch.cuda.device_count()}")
sys.exit(0 if torch.cuda.is_available() else 1)
PY

# Optional peers carried as wheels (no network there): pip download liger-kernel (and torchtune, torchao)
# into ./.whl on a machine with network; they are installed beside the machine's torch, never over it.
if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site "$ROOT"/.whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site" && say "peers from .whl: $(ls "$ROOT"/.whl | tr '\n' ' ')"
fi

# 1. build (in place: no pip, no network). setup.py picks CUDAExtension when torch has CUDA and nvcc exists.
if [ "${GPU_CHECK_SKIP_BUILD:-0}" != "1" ]; then
  say "build: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  if ! $PY setup.py build_ext --inplace > "$OUTDIR/build.log" 2>&1; then
    tail -40 "$OUTDIR/build.log"; say "BUILD FAILED (log: $OUTDIR/build.log)"; exit 1
  fi
  say "build ok ($(grep -c 'nvcc' "$OUTDIR/build.log") nvcc lines)"
fi
$PY - <<'PY' | tee -a "$OUTDIR/info.txt"
import torch, sdft_kernels  # noqa: F401
ops = sorted({s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("sdft_kernels::")})
cuda = [o for o in ops if torch._C._dispatch_has_kernel_for_dispatch_key(f"sdft_kernels::{o}", "CUDA")]
print(f"ops with a CUDA kernel: {len(cuda)}/{len(ops)}: {', '.join(cuda) or 'NONE'}")
PY

# 2. CUDA tests.
say "tests: pytest -m cuda"
# Bounded: a hung kernel must not eat the benchmarks' time (rc 124 = the timeout).
timeout "${GPU_CHECK_TEST_SECONDS:-180}" $PY -m pytest -m cuda -q -p no:cacheprovider tests/ \
  > "$OUTDIR/pytest_cuda.log" 2>&1
rc_tests=$?
summary=$(tail -n 1 "$OUTDIR/pytest_cuda.log")
say "CUDA tests (rc=$rc_tests): $summary"
[ $rc_tests -ne 0 ] && grep -E "^(FAILED|ERROR)" "$OUTDIR/pytest_cuda.log" | head -20

# 3. benchmarks (peak memory from the CUDA allocator, CUDA-event timing, floors measured in the run).
# Each family gets a deadline (the distillation family about half of the time left, CKA the rest), after
# which its remaining cases are recorded as skipped; a case already running is not interrupted.
say "benchmarks -> $OUTDIR"
rc_bench=0
: > "$OUTDIR/bench.log"
which=${GPU_CHECK_BENCH:-all}
families=$([ "$which" = all ] && echo "distill cka" || echo "$which")
for fam in $families; do
  left=$(( ${GPU_CHECK_SECONDS:-540} - ($(date +%s) - t0) - 30 ))   # 30 s for plots and the table
  share=$([ "$fam" = distill ] && [ "$which" = all ] && echo $(( left / 2 )) || echo $left)
  [ "$share" -lt 10 ] && share=10
  say "bench $fam (deadline ${share}s)"
  $PY -m sdft_kernels.bench "$fam" --device cuda --out "$OUTDIR" --deadline "$share" $QUICK \
    >> "$OUTDIR/bench.log" 2>&1 || rc_bench=$?
done

# 4. compact table last.
echo
say "CUDA tests: $summary"
grep -E "^(floors:|kernel |distill_loss|fused_linear|linear_cka|minibatch_cka|kernel_hsic)" "$OUTDIR/bench.log" \
  | awk '/^kernel /{t=1} t' 
[ $rc_bench -ne 0 ] && { tail -30 "$OUTDIR/bench.log"; say "benchmarks exited with $rc_bench"; }
grep -E "^floors:" "$OUTDIR/bench.log"
say "done: CSV/PNG in $OUTDIR (copy the CSVs into benchmarks/results/ and note the commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
exit $(( rc_tests != 0 || rc_bench != 0 ))
