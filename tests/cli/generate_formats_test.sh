#!/usr/bin/env bash
# `helix-gen generate` on the same tiny random-weight model as a llama2.c checkpoint (with the
# stories260K tokenizer file), as GGUF (vocabulary embedded), in float16 and bfloat16 weights,
# and as a Hugging Face directory (tokenizer file given): all print the same greedy text.
# Args: helix-gen, the test_models folder (ctest fixture), the shared folder.
set -u
gen=$1
models=$2
tok="$3/models/stories260K/tok512.bin"
run() {
  "$gen" generate --temperature 0 --max-tokens 24 --ignore-eos --threads 1 \
    --prompt "Once upon a time" "$@" 2>/tmp/helix_gf_err.$$ || {
    echo "FAIL: generate $* exited $?"; cat /tmp/helix_gf_err.$$; rm -f /tmp/helix_gf_err.$$; exit 1; }
  rm -f /tmp/helix_gf_err.$$
}
want=$(run --model "$models/llama.bin" --tokenizer "$tok")
[ -n "$want" ] || { echo "FAIL: llama.bin generated nothing"; exit 1; }
for args in "--model $models/llama_F32.gguf" "--model $models/llama_F16.gguf" \
            "--model $models/llama_F32.gguf --weight-dtype bfloat16" \
            "--model $models/llama_hf --tokenizer $tok"; do
  # shellcheck disable=SC2086
  got=$(run $args)
  if [ "$got" != "$want" ]; then
    echo "FAIL: $args"; echo "  want: $want"; echo "  got:  $got"; exit 1
  fi
done
# A bad --weight-dtype is a usage error naming the flag.
"$gen" generate --model "$models/llama_F32.gguf" --weight-dtype int3 >/dev/null 2>/tmp/helix_gf_err.$$
rc=$?
grep -q "weight-dtype" /tmp/helix_gf_err.$$ && [ "$rc" -eq 2 ] || {
  echo "FAIL: --weight-dtype int3 gave rc $rc"; cat /tmp/helix_gf_err.$$; rm -f /tmp/helix_gf_err.$$; exit 1; }
rm -f /tmp/helix_gf_err.$$
echo "ok: 5 formats give: $want"
