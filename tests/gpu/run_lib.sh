# Shared by the one-call device scripts (run_all.sh, run_engine.sh); sourced, not run. The
# caller sets ROOT, LOGS, BUDGET (seconds) and TAG (the log prefix) first. Puts the CUDA
# toolkit on PATH, picks the generator (GENERATOR), starts the clock (T0) and defines
#   reset_foreign_build: removes $BUILD when it was configured from another checkout path
#   (a CMake build folder cannot move), keeping $LOGS;
#   step NAME LOG TIMEOUT COMMAND...: runs COMMAND with its output in $LOGS/LOG (the timeout cut
#   to what is left of the budget), records "ok" / "FAILED ..." and the seconds in
#   RESULT[NAME]; skipped when less than 10 s of the budget is left.
if [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
GENERATOR=()
if command -v ninja > /dev/null; then
  GENERATOR=(-G Ninja)
fi
T0=$(date +%s)
declare -A RESULT
step() {
  local name=$1 log=$2 limit=$3
  shift 3
  local left=$(( T0 + BUDGET - $(date +%s) ))
  if (( left < 10 )); then
    RESULT[$name]="not run (the ${BUDGET}s budget is spent)"
    echo "[$TAG] $name: ${RESULT[$name]}"
    return 124
  fi
  (( limit > left )) && limit=$left
  local t
  t=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$LOGS/$log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - t ))
  if [[ $rc == 0 ]]; then
    RESULT[$name]="ok (${secs}s)"
  elif [[ $rc == 124 || $rc == 137 ]]; then
    RESULT[$name]="FAILED: timed out after ${secs}s (limit ${limit}s, see $log)"
  else
    RESULT[$name]="FAILED rc=$rc (${secs}s, see $log)"
  fi
  echo "[$TAG] $name: ${RESULT[$name]}"
  return $rc
}
reset_foreign_build() {
  if [[ -f $BUILD/CMakeCache.txt ]] &&
    ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$ROOT" "$BUILD/CMakeCache.txt"; then
    rm -rf "$BUILD"
    mkdir -p "$LOGS"
  fi
}
# gtest_each BIN LOGDIR JOBS LIMIT: runs every test of the GoogleTest binary BIN in its own process
# (a crash or hang fails that test alone), JOBS at a time, each bounded by LIMIT seconds; writes
# LOGDIR/<test>.log and LOGDIR/results.txt ("<test> ok|FAILED rc=N|SKIPPED|TIMEOUT"). Returns 1
# when any test failed.
gtest_each() {
  local bin=$1 dir=$2 jobs=$3 limit=$4
  mkdir -p "$dir"
  "$bin" --gtest_list_tests |
    awk '/^[^ ]/ { suite = $1; next } /^  / { print suite $1 }' > "$dir/tests.txt"
  HELIX_GTEST_BIN=$bin HELIX_GTEST_DIR=$dir HELIX_GTEST_LIMIT=$limit \
    xargs -a "$dir/tests.txt" -P "$jobs" -I{} bash -c '
      t=$1; f=$HELIX_GTEST_DIR/${t//\//_}.log
      timeout -k 5 "$HELIX_GTEST_LIMIT" "$HELIX_GTEST_BIN" --gtest_filter="$t" > "$f" 2>&1
      rc=$?
      if [[ $rc == 124 || $rc == 137 ]]; then echo "$t TIMEOUT (${HELIX_GTEST_LIMIT}s)"
      elif [[ $rc != 0 ]]; then echo "$t FAILED rc=$rc"
      elif grep -q "^\[  SKIPPED \]" "$f"; then echo "$t SKIPPED"
      else echo "$t ok"; fi' _ {} > "$dir/results.txt"
  ! grep -qE " (FAILED|TIMEOUT)" "$dir/results.txt"
}
