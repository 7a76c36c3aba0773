#!/usr/bin/env bash
# `helix-gen generate --tp T --cp C` on stories260K: the leader spawns its ranks, and the greedy
# tokens (255; 64 on 8 ranks, whose collectives are slow on a 2-core machine: still two blocks or
# more a rank) come out exactly as on one rank, for (T, C) in (1,2) (1,4) (2,2) (1,8), each
# layout with one or two of tokens_per_block 1, 4, 5, 32 (the engine-level helix_test covers
# more combinations in-process); no rank process outlives the run (nor a killed leader); a bad
# head split is refused.
# Exit 77 = skipped (model missing).
set -u
gen=$1
m="$2/models/stories260K"
if [ ! -f "$m/stories260K.bin" ]; then echo "SKIP: $m/stories260K.bin not found"; exit 77; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# A path unique to this run, so that leftover rank processes can be found by their arguments.
ln -s "$m/stories260K.bin" "$tmp/model.bin"
run() {
  timeout 300 "$gen" generate --model "$tmp/model.bin" --tokenizer "$m/tok512.bin" \
    --temperature 0 --threads 1 "$@" 2>"$tmp/err"
}
fail=0
# tokens_per_block -> the layouts run with it (tp cp tokens).
declare -A layouts=([1]="1 2 255" [4]="2 2 255|1 8 64" [5]="1 4 255" [32]="1 2 255")
for tpb in 1 4 5 32; do
  IFS='|' read -ra these <<<"${layouts[$tpb]}"
  for layout in "${these[@]}"; do
    set -- $layout
    run --max-tokens "$3" --tokens-per-block "$tpb" >"$tmp/want" ||
      { echo "FAIL: single rank tpb=$tpb"; cat "$tmp/err"; exit 1; }
    start=$(date +%s)
    if ! run --max-tokens "$3" --tp "$1" --cp "$2" --tokens-per-block "$tpb" >"$tmp/got"; then
      echo "FAIL: tp=$1 cp=$2 tpb=$tpb exited non-zero"; cat "$tmp/err"; fail=1; continue
    fi
    if ! cmp -s "$tmp/want" "$tmp/got"; then
      echo "FAIL: tp=$1 cp=$2 tpb=$tpb text differs from one rank"; diff "$tmp/want" "$tmp/got" | head -5
      fail=1
    fi
    if pgrep -f "$tmp/model.bin" >/dev/null; then
      echo "FAIL: tp=$1 cp=$2 tpb=$tpb left rank processes behind:"; pgrep -af "$tmp/model.bin"
      pkill -9 -f "$tmp/model.bin"; fail=1
    fi
    echo "ok: tp=$1 cp=$2 tokens_per_block=$tpb $3 tokens identical ($(( $(date +%s) - start )) s)"
  done
done
# A head split that does not divide: refused with a message about it, exit 1, nothing left.
run --max-tokens 255 --cp 3 >/dev/null
rc=$?
if [ "$rc" -eq 0 ] || ! grep -q "query heads are not divisible" "$tmp/err"; then
  echo "FAIL: --cp 3 gave rc $rc:"; cat "$tmp/err"; fail=1
fi
sleep 0.5
if pgrep -f "$tmp/model.bin" >/dev/null; then
  echo "FAIL: --cp 3 left rank processes behind"; pkill -9 -f "$tmp/model.bin"; fail=1
fi
# The leader killed mid-run: its ranks die with it (no orphans). Its tokens go to a file (it
# flushes each one): the ranks are counted, and the leader killed, as soon as decoding is under
# way, rather than after a fixed sleep by which a fast run could be over (no ranks left to
# count). 500 tokens (BOS + 500 within the model's 512) keep it running well past that point.
"$gen" generate --model "$tmp/model.bin" --tokenizer "$m/tok512.bin" --temperature 0 \
  --max-tokens 500 --ignore-eos --threads 1 --cp 4 >"$tmp/killed" 2>/dev/null &
leader=$!
ranks=0
for _ in $(seq 300); do
  if [ -s "$tmp/killed" ]; then
    ranks=$(pgrep -f -- "$tmp/model.bin.*--rank" | wc -l)
    break
  fi
  sleep 0.05
done
if [ "$ranks" -ne 3 ]; then
  echo "FAIL: --cp 4 was not decoding on 3 rank processes (saw $ranks)"; fail=1
fi
kill -9 "$leader"
wait "$leader" 2>/dev/null || true
for _ in $(seq 50); do pgrep -f "$tmp/model.bin" >/dev/null || break; sleep 0.1; done
if pgrep -f "$tmp/model.bin" >/dev/null; then
  echo "FAIL: ranks outlived their killed leader:"; pgrep -af "$tmp/model.bin"
  pkill -9 -f "$tmp/model.bin"; fail=1
else
  echo "ok: killing the leader took its ranks down"
fi
[ "$fail" -eq 0 ] && echo "ok: every layout matches one rank"
exit "$fail"
