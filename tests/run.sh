#!/usr/bin/env bash
# The README's test command: installs dependencies (Debian 12, as root; idempotent), builds,
# runs the unit tests once under AddressSanitizer+UBSan, then the whole suite with ctest.
# Exits non-zero on any failure; the last lines are ctest's summary of the full suite.
#   HELIX_BUILD_DIR   build folder (default: build)
#   HELIX_SKIP_ASAN=1 skip the sanitizer pass
#   HELIX_JOBS        parallel build/test jobs (default: nproc)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
build=${HELIX_BUILD_DIR:-build}
jobs=${HELIX_JOBS:-$(nproc)}

echo "== [1/4] dependencies"
./deploy/install-deps.sh

if [ "${HELIX_SKIP_ASAN:-0}" != 1 ]; then
  echo "== [2/4] unit tests under ASan+UBSan (${build}-asan)"
  # -O1 -g1 (line tables: reports keep file:line) and asserts on: half the compile time of
  # RelWithDebInfo's -O2 -g on 2 cores, for about the same test time.
  cmake -S . -B "${build}-asan" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" \
    -DHELIX_SANITIZE=address -DHELIX_WITH_CUDA=OFF -DHELIX_BUILD_BENCHMARKS=OFF >/dev/null
  # Only what `ctest -L unit` runs: the servers and the tests that start them are not built here.
  cmake --build "${build}-asan" -j "$jobs" --target helix_unit_tests
  (cd "${build}-asan" && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
     UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
     ctest -L unit -j "$jobs" --output-on-failure --timeout 600)
else
  echo "== [2/4] ASan pass skipped (HELIX_SKIP_ASAN=1)"
fi

echo "== [3/4] build (${build})"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j "$jobs"

echo "== [4/4] full test suite"
cd "$build"
ctest -j "$jobs" --output-on-failure --timeout 600
