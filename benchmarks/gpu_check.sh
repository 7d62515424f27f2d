#!/usr/bin/env bash
# One prepared GPU check for the H100/H200 device machine: build with CUDA (or reuse the extensions a previous
# check built, carried in .gpu_build/), run the CUDA-device tests (Triton and CUDA backends), then the benchmarks
# at GPU sizes. Everything lands in OUT_DIR as at most 4 files (the device tool returns 8):
#   check.txt   versions, measured ceilings, test summary, benchmark tables
#   logs.tar.gz build.log, tests.log, one JSON per benchmark
#   so.tar.gz   the built extensions (carry them back as .gpu_build/ to skip the build next time)
#   bash benchmarks/gpu_check.sh OUT_DIR [pytest -k expression] [benchmark names..., kept, pipeline]
# The kept-set log-probs (kept_threshold) are in both lists: their CUDA tests run under the default -k cuda, and
# bench_logprobs prints the "kept-set vs plain" table first (target: kept / plain <= 1.10); for that alone:
#   bash benchmarks/gpu_check.sh OUT_DIR kept kept
# Budget: GPU_CHECK_BUDGET seconds (default 500); benchmarks that would run past it are skipped.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [pytest -k expr] [bench names]}
select=${2:-cuda}
shift 2 2>/dev/null || shift $#
benches=${*:-"logprobs linear_logprobs ppo_loss advantages sampling trl_patch pipeline"}
cd "$(dirname "$0")/.."
repo=$PWD
logs=$(mktemp -d)
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
budget=${GPU_CHECK_BUDGET:-500}  # seconds for the whole script; benchmarks are cut to fit
log() { echo "$@" | tee -a "$out/check.txt"; }

if ls .whl/*.whl >/dev/null 2>&1; then  # peers (trl, liger-kernel) carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
  python3 - <<'EOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
from triton.testing import do_bench
x = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
y = torch.empty_like(x)
ms = do_bench(lambda: y.copy_(x), return_mode="median")
print(f"ceiling: device copy {2 * x.numel() / ms / 1e6:.0f} GB/s (read + write)")
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
ms = do_bench(lambda: a @ a, return_mode="median")
print(f"ceiling: bf16 matmul 8192^3 {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s")
EOF
} 2>&1 | tee "$out/check.txt"

so_dir=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/rlhf_fast
stamp=$(python3 -c "import torch; print(torch.__version__)")-$(cat setup.py csrc/*/* | sha1sum | cut -c1-12)
if [ -f .gpu_build/stamp ] && [ "$(cat .gpu_build/stamp)" = "$stamp" ]; then
  log "== reusing the extensions built by an earlier check ($stamp)"
  RLHF_FAST_NO_EXTENSIONS=1 python3 -m pip install -q --no-deps --no-build-isolation . > "$logs/build.log" 2>&1
  cp .gpu_build/*.so "$so_dir/"
else
  log "== build (CUDA forced, sm_${TORCH_CUDA_ARCH_LIST/./})"
  start=$SECONDS
  if ! RLHF_FAST_CUDA=1 MAX_JOBS=16 timeout 300 python3 -m pip install -q --no-deps --no-build-isolation . \
      > "$logs/build.log" 2>&1; then
    log "CUDA build FAILED (tail of build.log follows); building without CUDA so Triton can still be checked"
    grep -E "error|Error" "$logs/build.log" | head -20 | tee -a "$out/check.txt"
    RLHF_FAST_CUDA=0 MAX_JOBS=16 python3 -m pip install -q --no-deps --no-build-isolation . >> "$logs/build.log" 2>&1
  fi
  log "build took $((SECONDS - start)) s"
  mkdir -p "$logs/so" && cp "$so_dir"/*.so "$logs/so/" && echo "$stamp" > "$logs/so/stamp"
  tar -czf "$out/so.tar.gz" -C "$logs/so" .
fi
(cd /tmp && rlhf-fast info) 2>&1 | tee -a "$out/check.txt"

log "== tests on CUDA tensors (-k '$select')"
start=$SECONDS
(cd /tmp && timeout 200 python3 -m pytest -q -n 12 -k "$select" -p no:cacheprovider --timeout 120 -rfE --tb=short \
  "$repo/tests" > "$logs/tests.log" 2>&1)
grep -E "^(FAILED|ERROR)" "$logs/tests.log" | cut -c1-230 | head -40 | tee -a "$out/check.txt"
tail -1 "$logs/tests.log" | tee -a "$out/check.txt"
log "tests took $((SECONDS - start)) s"

log "== benchmarks"
cd benchmarks
for name in $benches; do
  left=$((budget - SECONDS)); [ $left -gt 150 ] && left=150
  [ $left -lt 20 ] && { log "bench_$name: skipped (out of time)"; continue; }
  start=$SECONDS
  if [ "$name" = kept ]; then  # the kept-set vs plain log-probs table alone
    timeout $left python3 bench_logprobs.py --device cuda --reps 20 --kept-only --json "$logs/bench_kept.json" \
      > "$logs/bench_$name.txt" 2>&1
    rc=$?
  elif [ "$name" = pipeline ]; then  # the trainers on CUDA (bf16 autocast, fused ops): a shortened SFT -> RM -> PPO
    (cd /tmp && timeout $left rlhf-fast pipeline --out /tmp/gpu_pipeline device=cuda progress=false \
      sft.num_examples=3000 sft.epochs=2 ppo.iterations=20 ppo.eval_prompts=192) > "$logs/bench_$name.txt" 2>&1
    rc=$?
    cp /tmp/gpu_pipeline/summary.json "$logs/pipeline_summary.json" 2>/dev/null
  else
    [ -f "bench_$name.py" ] || continue
    timeout $left python3 "bench_$name.py" --device cuda --reps 20 --json "$logs/bench_$name.json" \
      > "$logs/bench_$name.txt" 2>&1
    rc=$?
  fi
  cat "$logs/bench_$name.txt" >> "$out/check.txt"
  log "bench_$name: exit $rc, $((SECONDS - start)) s"
done
tar -czf "$out/logs.tar.gz" -C "$logs" --exclude so .
