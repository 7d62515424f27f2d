#!/usr/bin/env bash
# One prepared GPU check (H100/H200 device machine): build with CUDA, run the test suite on CUDA tensors (Triton and
# CUDA backends), run the benchmarks at GPU sizes, and leave logs and tables in OUT_DIR (check.txt, build.log,
# benchmarks.txt, one JSON per benchmark: within the device tool's 8 returned files). Budget: under 8 minutes.
#   bash benchmarks/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$out/check.txt"

echo "== build (CUDA forced)"
RLHF_FAST_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  timeout 300 python3 -m pip install -q --no-deps --no-build-isolation . > "$out/build.log" 2>&1 \
  || { echo "build failed"; tail -40 "$out/build.log"; exit 1; }
(cd /tmp && rlhf-fast info) 2>&1 | tee -a "$out/check.txt"

echo "== tests on CUDA"
(cd /tmp && timeout 240 python3 -m pytest -q -x -k "cuda" -p no:cacheprovider "$OLDPWD/tests" 2>&1) | tail -40 | tee -a "$out/check.txt"

echo "== benchmarks"
cd benchmarks
for bench in bench_*.py; do
  name=${bench%.py}
  timeout 180 python3 "$bench" --device cuda --json "$out/$name.json" 2>&1 | tee -a "$out/benchmarks.txt"
done
