#!/usr/bin/env bash
# The CUDA build as a GPU machine does it, on a machine with nvcc and no GPU: a second virtual
# environment with a CUDA build of torch, the package installed into it from a copy of this tree
# (setup.py's CUDAExtension path, sm_80 and sm_90), imported, every op checked for a CUDA kernel, and
# the test suite run against it (CUDA tests skip without a device).
# Compiling objects alone (compile_cuda.sh) cannot catch link errors, symbols left unresolved at import,
# setup.py's CUDA path, or Python code that behaves differently under a CUDA build of torch (the forked
# ranks of test_distributed died there). Where the CUDA torch wheel cannot be installed, this falls back
# to compile_cuda.sh, loudly; a build, import or test failure fails.
# Env: CUDA_TORCH (default torch==2.14.1, a CUDA 13.0 build: it must match nvcc's major version),
#      CUDA_VENV (default .venv-cuda), CUDA_TREE (default build/cuda_tree), TORCH_CUDA_ARCH_LIST.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${CUDA_VENV:-$ROOT/.venv-cuda}
TREE=${CUDA_TREE:-$ROOT/build/cuda_tree}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then echo "cuda_build: nvcc not found (set NVCC)"; exit 1; fi
OUTER_PY=${PYTHON:-$(command -v python || command -v python3)}  # the caller's (CPU torch): the fallback's
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0} MAX_JOBS=${MAX_JOBS:-2}
# No CUDA_HOME set here: setup.py finds the toolkit itself (this machine's nvcc is a wrapper outside it).
echo "cuda_build: nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), archs $TORCH_CUDA_ARCH_LIST"

rm -rf "$VENV" "$TREE"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
pip install -q --upgrade pip setuptools wheel
if ! pip install -q "${CUDA_TORCH:-torch==2.14.1}" ninja; then
  echo "cuda_build: WARNING: no CUDA build of torch could be installed; link check skipped, objects only"
  deactivate
  PYTHON=$OUTER_PY exec bash .ci/compile_cuda.sh
fi
python -c "import torch, sys; print('cuda_build: torch', torch.__version__, 'CUDA', torch.version.cuda); sys.exit(torch.version.cuda is None)"

# A copy of the working tree, so the CPU build's in-place extension beside it is left alone.
mkdir -p "$TREE"
tar --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude=./runs --exclude='*.so' -cf - . | tar -xf - -C "$TREE"
cd "$TREE"
time pip install --no-build-isolation -e ".[test]" -c <(python -c "import torch; print('torch==' + torch.__version__.split('+')[0])")
python - <<'PY'
import torch, sdft_kernels  # noqa: F401  (the import resolves every symbol: Python loads extensions RTLD_NOW)
ops = sorted({s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("sdft_kernels::")})
missing = [o for o in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"sdft_kernels::{o}", "CUDA")]
print(f"cuda_build: {len(ops) - len(missing)}/{len(ops)} ops have a CUDA kernel")
raise SystemExit(f"cuda_build: no CUDA kernel for {missing}" if missing or not ops else 0)
PY
sdft info
pytest -q -p no:cacheprovider
