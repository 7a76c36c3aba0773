#!/usr/bin/env bash
# `helix-gen generate` writes only the generated text to stdout (diagnostics to stderr) and
# reproduces llama2.c's greedy stories260K output. Exit 77 = skipped (model missing).
set -u
gen=$1
shared=$2
m="$shared/models/stories260K"
if [ ! -f "$m/stories260K.bin" ]; then echo "SKIP: $m/stories260K.bin not found"; exit 77; fi
out=$(mktemp); err=$(mktemp); nan=$(mktemp)
trap 'rm -f "$out" "$err" "$nan"' EXIT
"$gen" generate --model "$m/stories260K.bin" --tokenizer "$m/tok512.bin" --temperature 0 \
  --max-tokens 40 --threads 1 >"$out" 2>"$err" || { echo "FAIL: exit $?"; cat "$err"; exit 1; }
want="Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
if ! head -c ${#want} "$out" | grep -qxF "$want"; then
  echo "FAIL: stdout does not start with the oracle text:"; cat "$out"; exit 1
fi
grep -q "finish_reason=length" "$err" || { echo "FAIL: no finish line on stderr"; cat "$err"; exit 1; }
# A bad flag value is a usage error naming the flag.
"$gen" generate --model "$m/stories260K.bin" --tokenizer "$m/tok512.bin" --kv-dtype int4 \
  >"$out" 2>"$err"
rc=$?
[ "$rc" -eq 2 ] && grep -q "kv-dtype" "$err" || { echo "FAIL: --kv-dtype int4 gave rc $rc"; cat "$err"; exit 1; }
# A model whose logits are all NaN (every weight NaN: an overflow's outcome) ends the request
# with an error saying so, greedy and sampled, instead of emitting token 0 or a made-up one.
head -c 28 "$m/stories260K.bin" >"$nan"
size=$(stat -c %s "$m/stories260K.bin")
head -c $(( (size - 28) / 4 )) /dev/zero | tr '\0' '\1' | sed 's/\x01/\x00\x00\xc0\x7f/g' >>"$nan"
[ "$(stat -c %s "$nan")" -eq "$size" ] || { echo "FAIL: NaN model has the wrong size"; exit 1; }
for t in 0 1; do
  "$gen" generate --model "$nan" --tokenizer "$m/tok512.bin" --temperature $t --max-tokens 4 \
    --threads 1 >"$out" 2>"$err"
  rc=$?
  [ "$rc" -eq 1 ] && grep -q "every logit is NaN or -inf" "$err" && ! grep -q "[^[:space:]]" "$out" || {
    echo "FAIL: NaN logits at temperature $t gave rc $rc"; cat "$out" "$err"; exit 1; }
done
echo "ok"
