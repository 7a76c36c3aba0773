#!/usr/bin/env bash
# One device call on the lent GPU machine: configure the kernels-only tree (no Debian packages
# there; GoogleTest is built from the sources carried in .devdeps), build with every core, run
# the GPU tests and the decode-attention benchmarks (ours, then PyTorch SDPA on the same
# shapes), and print a short summary last. Needs no network.
#
#   tests/gpu/run_all.sh            (from the repository root; carry [".devdeps"])
#
# Full logs go to $OUT when set (else build-gpu/logs): configure.log build.log ctest.log
# attention_bench.log attention_bench.csv sdpa_bench.log sdpa_bench.csv summary.txt.
# Environment: BUILD_DIR (default build-gpu), QUICK=1 for a shorter benchmark.
# Expected: ~3 minutes on a 16-core H100/H200 machine; every step has a timeout and the
# timeouts add up to < 10 minutes, so the summary is always printed within a 10-minute call.
#
# .devdeps (ignored by git through .git/info/exclude) holds the Debian googletest sources; to
# recreate it on a Debian 12 machine:
#   mkdir -p .devdeps && cd .devdeps && apt-get download googletest libgtest-dev &&
#   for f in *.deb; do dpkg -x "$f" root; done && rm -f *.deb
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
BUILD=${BUILD_DIR:-$ROOT/build-gpu}
LOGS=${OUT:-$BUILD/logs}
mkdir -p "$LOGS"
JOBS=$(nproc)
QUICK_FLAG=()
if [[ "${QUICK:-0}" == 1 ]]; then
  QUICK_FLAG=(--quick)
fi
if [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
GENERATOR=()
if command -v ninja > /dev/null; then
  GENERATOR=(-G Ninja)
fi

T0=$(date +%s)
declare -A RESULT
step() {  # step NAME LOG TIMEOUT COMMAND...: runs, records ok / FAILED (rc) and seconds
  local name=$1 log=$2 limit=$3
  shift 3
  local t=$(date +%s)
  timeout "$limit" "$@" > "$LOGS/$log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - t ))
  if [[ $rc == 0 ]]; then
    RESULT[$name]="ok (${secs}s)"
  else
    RESULT[$name]="FAILED rc=$rc (${secs}s, see $log)"
  fi
  echo "[run_all] $name: ${RESULT[$name]}"
  return $rc
}

# A build folder configured from another checkout path cannot be reused: start it afresh.
if [[ -f $BUILD/CMakeCache.txt ]] &&
  ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$ROOT" "$BUILD/CMakeCache.txt"; then
  rm -rf "$BUILD"
  mkdir -p "$LOGS"
fi
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
if [[ $BUILD_OK == 0 ]]; then
  step ctest ctest.log 90 bash -c "cd '$BUILD' && ctest -L gpu --output-on-failure"
  step attention_bench attention_bench.log 120 \
    "$BUILD/tests/gpu/attention_bench" --csv "$LOGS/attention_bench.csv" "${QUICK_FLAG[@]}"
else
  RESULT[ctest]="not run (build failed)"
  RESULT[attention_bench]="not run (build failed)"
fi
step sdpa_bench sdpa_bench.log 110 python3 "$ROOT/tests/gpu/sdpa_bench.py" \
  --csv "$LOGS/sdpa_bench.csv" "${QUICK_FLAG[@]}"

{
  echo "==== run_all summary ($(( $(date +%s) - T0 ))s total) ===="
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
    sed 's/^/device: /'
  for s in configure build ctest attention_bench sdpa_bench; do
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
} > "$LOGS/summary.txt" 2>&1
cat "$LOGS/summary.txt"
