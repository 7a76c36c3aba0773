#!/usr/bin/env bash
# The binaries' command-line contract: --help/--version, check-config exit codes (0 valid
# with resolved JSON on stdout, 2 invalid with the message on stderr) for every role.
# Usage: check_config_test.sh BIN_DIR SOURCE_DIR
set -u
bin=$1
src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
check() {  # check NAME EXPECTED_RC CMD...
  local name=$1 want=$2
  shift 2
  "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  if [ "$rc" -ne "$want" ]; then
    echo "FAIL $name: exit $rc, expected $want"; sed 's/^/  stderr: /' "$tmp/err" | head -5
    fail=1
  else
    echo "ok   $name"
  fi
}
expect_in() {  # expect_in NAME FILE TEXT
  if ! grep -qF -- "$3" "$2"; then
    echo "FAIL $1: '$3' not in $(basename "$2"):"; sed 's/^/  /' "$2" | head -5; fail=1
  fi
}

for b in helix-gen helix-ctx helix-router; do
  check "$b --version" 0 "$bin/$b" --version
  expect_in "$b --version" "$tmp/out" "0.1.0"
  check "$b --help" 0 "$bin/$b" --help
  expect_in "$b --help" "$tmp/out" "check-config"
done
check "helix-gen without subcommand" 2 "$bin/helix-gen"
check "helix-gen bad flag" 2 "$bin/helix-gen" generate --model x --nope 1

check "gen check-config shipped" 0 "$bin/helix-gen" check-config "$src/configs/gen_cpu_cp2.json"
expect_in "gen resolved json" "$tmp/out" '"context_parallel_size": 2'
expect_in "gen resolved json" "$tmp/out" '"cp_type": "HELIX"'
expect_in "gen resolved defaults" "$tmp/out" '"kv_transfer_timeout_ms": 10000'
check "gen check-config shipped cuda" 0 "$bin/helix-gen" check-config "$src/configs/gen_cuda_cp2.json"
expect_in "gen cuda resolved json" "$tmp/out" '"backend": "cuda"'
check "ctx check-config shipped" 0 "$bin/helix-ctx" check-config "$src/configs/ctx_cpu.json"
expect_in "ctx resolved json" "$tmp/out" '"kv_lease_ms": 30000'
check "router check-config shipped" 0 "$bin/helix-router" check-config "$src/configs/router.json"
expect_in "router resolved json" "$tmp/out" '"served_model_name": "stories260K"'

model="$src/../shared/models/stories260K/stories260K.bin"
cat >"$tmp/mismatch.json" <<JSON
{"model": "$model", "context_parallel_size": 2,
 "cp_config": {"cp_type": "HELIX", "tokens_per_block": 16},
 "kv_cache_config": {"tokens_per_block": 32}}
JSON
check "gen tokens_per_block mismatch" 2 "$bin/helix-gen" check-config "$tmp/mismatch.json"
expect_in "mismatch message" "$tmp/err" "'cp_config.tokens_per_block' = 16"
expect_in "mismatch message" "$tmp/err" "'kv_cache_config.tokens_per_block' = 32"
printf '{"model": "%s",\n  "tensor_parallel_size": 1,\n' "$model" >"$tmp/trunc.json"
check "gen truncated json" 2 "$bin/helix-gen" check-config "$tmp/trunc.json"
expect_in "truncated message" "$tmp/err" "trunc.json:3:"
check "gen missing file" 2 "$bin/helix-gen" check-config "$tmp/absent.json"
expect_in "missing message" "$tmp/err" "absent.json"
echo '{"model": "nowhere.bin"}' >"$tmp/nomodel.json"
check "ctx missing model" 2 "$bin/helix-ctx" check-config "$tmp/nomodel.json"
expect_in "missing model message" "$tmp/err" "nowhere.bin"
echo '{"model": "'"$model"'", "generation_servers": {"urls": ["nohost"]}}' >"$tmp/r.json"
check "router bad url" 2 "$bin/helix-router" check-config "$tmp/r.json"
check "gen serve invalid config" 2 "$bin/helix-gen" serve --config "$tmp/mismatch.json"

# deploy/cluster.py refuses a bad cluster file (exit 2, one line) before it starts anything.
printf '{"model": "%s", "server": {"server": {"api_key": "k"}}}\n' "$model" >"$tmp/cl1.json"
check "cluster server.server" 2 python3 "$src/deploy/cluster.py" up --config "$tmp/cl1.json" \
  --build "$bin/.."
expect_in "cluster server.server message" "$tmp/err" "'server.server' is not taken"
printf '{"model": "%s", "server": 3}\n' "$model" >"$tmp/cl2.json"
check "cluster server not an object" 2 python3 "$src/deploy/cluster.py" up \
  --config "$tmp/cl2.json" --build "$bin/.."
expect_in "cluster server message" "$tmp/err" "'server' must be an object"

# A misspelt key or a number given as a string: one line naming it, exit 2 (the typo was
# ignored, the string ended in a traceback).
echo '{"model": "m.gguf", "generaton_servers": {"count": 2}}' > "$tmp/cl3.json"
check "cluster unknown key" 2 python3 "$src/deploy/cluster.py" up --config "$tmp/cl3.json" \
  --build "$bin/.."
expect_in "cluster unknown key message" "$tmp/err" "unknown key 'generaton_servers'"
echo '{"model": "m.gguf", "generation_servers": {"context_parallel_size": "2"}}' > "$tmp/cl4.json"
check "cluster string number" 2 python3 "$src/deploy/cluster.py" up --config "$tmp/cl4.json" \
  --build "$bin/.."
expect_in "cluster string number message" "$tmp/err" \
  "'generation_servers.context_parallel_size' = \"2\": expected an integer"

# A directory given as the config is named as such (it read as "unexpected end of input").
check "check-config on a directory" 2 "$bin/helix-gen" check-config "$tmp"
expect_in "check-config directory message" "$tmp/err" "is not a regular file"
# generate's flags take the config's ranges: a usage error naming the flag.
for flag in "--threads -1" "--tokens-per-block 100000" "--max-seq-len -5" "--backend tpu"; do
  # shellcheck disable=SC2086
  check "generate $flag" 2 "$bin/helix-gen" generate --model x.bin $flag
  expect_in "generate $flag message" "$tmp/err" "${flag%% *}"
done

# --drain-ms out of range is a usage error (a negative one meant no drain at all).
for b in helix-gen helix-ctx; do
  check "$b --drain-ms -5" 2 "$bin/$b" serve --config "$src/configs/gen_cpu_cp2.json" --drain-ms -5
  expect_in "$b --drain-ms message" "$tmp/err" "--drain-ms"
done

exit $fail
