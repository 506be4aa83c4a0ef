#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu to an object file with nvcc, for sm_80 and sm_90, against the
# installed torch's headers. Works with the CPU torch wheel (no GPU, no CUDA torch needed): the
# kernels never rot on machines that cannot run them. Exits non-zero on the first compile error.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then echo "compile_cuda: nvcc not found (set NVCC)"; exit 1; fi
mapfile -t INCS < <("$PY" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
PYINC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
OUTDIR=${OUTDIR:-build/cuda_check}
mkdir -p "$OUTDIR"
FLAGS=(-std=c++20 -O3 --expt-relaxed-constexpr -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
  -Icsrc -I"$PYINC" -Xcompiler -fPIC)
for inc in "${INCS[@]}"; do FLAGS+=(-I"$inc"); done
shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "compile_cuda: no csrc/cuda/*.cu files"; exit 1; fi
compile_one() {
  local f=$1 obj start
  obj="$OUTDIR/$(basename "${f%.cu}").o"
  start=$(date +%s)
  "$NVCC" "${FLAGS[@]}" -c "$f" -o "$obj" || { echo "compile_cuda: FAILED $f"; return 1; }
  echo "compile_cuda: $f -> $obj ($(( $(date +%s) - start )) s, sm_80+sm_90)"
}
# NVCC_JOBS files at a time (default: 2, this project's core count); any failure fails the script.
pids=()
for f in "${files[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "${NVCC_JOBS:-2}" ]; do sleep 1; done
  compile_one "$f" & pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
if [ "$status" -ne 0 ]; then echo "compile_cuda: CUDA compile check failed"; exit 1; fi
echo "compile_cuda: ${#files[@]} CUDA files compiled"
