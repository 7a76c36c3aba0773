#!/usr/bin/env bash
# One device call on the lent GPU machine: configure the kernels-only tree (no Debian packages
# there; GoogleTest is built from the sources carried in .devdeps), build with every core, run
# the GPU tests, the decode-attention benchmarks (GQA: ours, then PyTorch SDPA on the same shapes;
# MLA: ours against the read/copy/FMA references), the DeepSeek check against transformers' native
# DeepseekV3/V2, and the MLA tests under compute-sanitizer (racecheck, memcheck); print a short
# summary last. Needs no network.
#
#   tests/gpu/run_all.sh            (from the repository root; carry [".devdeps"])
#
# Full logs go to $OUT when set (else build-gpu/logs): configure.log build.log ctest.log
# attention_bench.log attention_bench.csv mla_bench.log mla_bench.csv sdpa_bench.log
# sdpa_bench.csv mla_models.log hf_check.log racecheck.log memcheck.log summary.txt.
# Environment: BUILD_DIR (default build-gpu), QUICK=1 for shorter benchmarks, RUN_ALL_BUDGET_S
# (default 540): no step starts after that many seconds and no step's timeout runs past it, so
# the summary is always printed within a 10-minute call; the sanitizer steps come last and get
# what is left (at most 120 s each).
# Expected: ~4 minutes on a 16-core H100/H200 machine before the sanitizer steps (MLA bench ~15 s,
# model generation ~2 s, transformers check ~20 s), which add up to 4 more (their slowdown on
# these kernels has not been measured yet; a timeout there is reported, not fatal to the rest).
#
# .devdeps (ignored by git) holds the Debian googletest sources in root/; `bash
# tests/gpu/prepare_devdeps.sh` on the Debian 12 dev machine makes it (with run_engine.sh's
# packages and models too).
set -u
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
BUILD=${BUILD_DIR:-$ROOT/build-gpu}
LOGS=${OUT:-$BUILD/logs}
mkdir -p "$LOGS"
JOBS=$(nproc)
QUICK_FLAG=()
if [[ "${QUICK:-0}" == 1 ]]; then
  QUICK_FLAG=(--quick)
fi
BUDGET=${RUN_ALL_BUDGET_S:-540}
TAG=run_all
source "$ROOT/tests/gpu/run_lib.sh"

reset_foreign_build
GTEST_SRC=$ROOT/.devdeps/root/usr/src/googletest
GTEST_FLAG=()
if [[ -f $GTEST_SRC/CMakeLists.txt ]]; then
  GTEST_FLAG=(-DHELIX_GTEST_SOURCE_DIR="$GTEST_SRC")
else
  echo "[run_all] warning: no $GTEST_SRC (carry .devdeps): configure needs an installed GTest"
fi
step configure configure.log 60 cmake -S "$ROOT" -B "$BUILD" "${GENERATOR[@]}" \
  -DHELIX_KERNELS_ONLY=ON -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCMAKE_PREFIX_PATH="$ROOT/.devdeps/root/usr" "${GTEST_FLAG[@]}"
step build build.log 200 cmake --build "$BUILD" -j "$JOBS" --target cuda_ops_test gpu_attention_bench
BUILD_OK=$?
SANITIZER=$(command -v compute-sanitizer || true)
if [[ -z $SANITIZER && -x /usr/local/cuda/bin/compute-sanitizer ]]; then
  SANITIZER=/usr/local/cuda/bin/compute-sanitizer
fi
if [[ $BUILD_OK == 0 ]]; then
  step ctest ctest.log 90 bash -c "cd '$BUILD' && ctest -L gpu --output-on-failure"
  step attention_bench attention_bench.log 120 \
    "$BUILD/tests/gpu/attention_bench" --csv "$LOGS/attention_bench.csv" "${QUICK_FLAG[@]}"
  step mla_bench mla_bench.log 90 \
    "$BUILD/tests/gpu/attention_bench" --mla --csv "$LOGS/mla_bench.csv" "${QUICK_FLAG[@]}"
else
  for s in ctest attention_bench mla_bench racecheck memcheck; do
    RESULT[$s]="not run (build failed)"
  done
fi
# The tiny DeepSeek checkpoints and our float64 reference logits (numpy + safetensors), then
# transformers' native DeepseekV3/V2 on them.
MLA_MODELS=$BUILD/mla_models
rm -rf "$MLA_MODELS"
if step mla_models mla_models.log 60 python3 "$ROOT/tests/models/make_mla_models.py" \
  "$MLA_MODELS"; then
  step hf_check hf_check.log 150 python3 "$ROOT/tests/gpu/deepseek_hf_check.py" "$MLA_MODELS"
else
  RESULT[hf_check]="not run (mla_models failed)"
fi
step sdpa_bench sdpa_bench.log 110 python3 "$ROOT/tests/gpu/sdpa_bench.py" \
  --csv "$LOGS/sdpa_bench.csv" "${QUICK_FLAG[@]}"
# Last: the MLA kernel tests under compute-sanitizer, each bounded (hazards found before a
# timeout are in the log).
if [[ $BUILD_OK == 0 ]]; then
  if [[ -n $SANITIZER ]]; then
    for tool in racecheck memcheck; do
      step $tool $tool.log 120 "$SANITIZER" --tool $tool --error-exitcode 1 \
        "$BUILD/tests/gpu/cuda_ops_test" '--gtest_filter=CudaOpsTest.MlaAttention*'
    done
  else
    RESULT[racecheck]="not run (no compute-sanitizer)"
    RESULT[memcheck]="not run (no compute-sanitizer)"
  fi
fi

{
  echo "==== run_all summary ($(( $(date +%s) - T0 ))s total) ===="
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
    sed 's/^/device: /'
  for s in configure build ctest attention_bench mla_bench mla_models hf_check sdpa_bench \
    racecheck memcheck; do
    printf '%-16s %s\n' "$s" "${RESULT[$s]:-not run}"
  done
  if [[ -f "$LOGS/ctest.log" ]]; then
    grep -E "tests passed|tests failed|\(Failed\)|\(Skipped\)|Timeout" "$LOGS/ctest.log" | head -8
    grep -E "^\[  FAILED  \]" "$LOGS/ctest.log" | sort -u | head -12
  fi
  echo "attention (ours: PagedAttentionCuda; frac = KV GB/s / pure-read GB/s of the same bytes;"
  echo "D2D = cudaMemcpy counted read+write; torch = SDPA, same run; variants in ms):"
  python3 "$ROOT/tests/gpu/sdpa_bench.py" --summary --ours "$LOGS/attention_bench.csv" \
    --torch "$LOGS/sdpa_bench.csv"
  if [[ -s "$LOGS/mla_bench.csv" ]]; then
    echo "MLA decode (MlaAttentionCuda, bf16 rows 512 + 64, 64 tokens/block; GB/s = KV bytes once"
    echo "/ time; /read, /D2D = over the read kernel's and the D2D copy's GB/s on the same bytes;"
    echo "TFLOP/s = 2 x heads x 1088 per row / time; /FMA = over the fp32 FMA kernel, same run):"
    awk -F, 'NR == 1 { printf "%8s %5s %5s %6s %9s %6s %6s %6s %7s %6s\n", "tokens", "batch",
                         "heads", "splits", "ms", "GB/s", "/read", "/D2D", "TFLOP/s", "/FMA"; next }
      { printf "%8s %5s %5s %6s %9.4f %6.0f %6.3f %6.3f %7.1f %6.3f\n", $1, $2, $3, $5, $6, $7,
               $9, $11, $12, $14; fma = $13 }
      END { printf "(fp32 FMA kernel: %.1f TFLOP/s)\n", fma }' "$LOGS/mla_bench.csv"
    grep -h "NON-FINITE" "$LOGS/mla_bench.log" | head -3
  fi
  if [[ -f "$LOGS/hf_check.log" ]]; then
    sed -n '/^==== deepseek_hf_check summary/,$p' "$LOGS/hf_check.log"
    grep -hE "LOAD (FAILED|PROBLEM)|cannot import|Traceback" "$LOGS/hf_check.log" | head -5
  fi
  for tool in racecheck memcheck; do
    if [[ -f "$LOGS/$tool.log" ]]; then
      echo "$tool (cuda_ops_test CudaOpsTest.MlaAttention*):"
      grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|^\[ +(PASSED|FAILED) +\]" "$LOGS/$tool.log" |
        head -4
      grep -hE "^========= +(Error|Warning|Invalid|Race|Barrier|Uninitialized)" "$LOGS/$tool.log" |
        head -4
    fi
  done
} > "$LOGS/summary.txt" 2>&1
cat "$LOGS/summary.txt"
