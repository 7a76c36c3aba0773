#!/usr/bin/env bash
# Decode tokens/s of Helix and of llama.cpp (PyPI llama-cpp-python, built from source) on the
# same GGUF, the same thread count and the same protocol (random prompt, greedy, batch 1), side
# by side in one run, at 512 and ~8K tokens of context; plus Helix alone at batch 16 and on
# stories260K. Prints the raw lines and a ratio per context. Not a test: run it by hand.
#   HELIX_BUILD_DIR  build folder with tests/decode_bench (default: build)
#   HELIX_THREADS    threads for both engines (default: nproc)
#   HELIX_STEPS      decode steps per run (default: 64)
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${HELIX_BUILD_DIR:-build}
threads=${HELIX_THREADS:-$(nproc)}
steps=${HELIX_STEPS:-64}
cache=${HELIX_CACHE_DIR:-$HOME/.cache/helix}
py="$cache/venv/bin/python"
shared=${HELIX_SHARED_DIR:-$(cd .. && pwd)/shared}

./deploy/install-deps.sh >&2
if ! "$py" -c "import llama_cpp" 2>/dev/null; then
  echo "compare_llamacpp: building llama-cpp-python 0.3.36 into $cache/venv (several minutes)" >&2
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
    "$py" -m pip install -q --disable-pip-version-check llama-cpp-python==0.3.36 >&2
fi
model=$(./deploy/fetch-model.sh)
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" --target decode_bench >&2
bench="$build/tests/decode_bench"

echo "# machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; threads=$threads"
"$py" -c "import llama_cpp; print('# llama-cpp-python', llama_cpp.__version__)"
# The model's context is 8192: 8192 - steps tokens of prompt leave room for every step. Both
# sides time the steps - 1 decode steps after the prefill's token, with no warm-up.
for ctx in 512 $((8192 - steps)); do
  ours=$("$bench" --model "$model" --context "$ctx" --steps $((steps - 1)) --warmup 0 \
         --threads "$threads" --kv-dtype float16 2>/dev/null)
  theirs=$("$py" tests/bench/llamacpp_decode.py "$model" "$ctx" "$steps" "$threads")
  echo "$ours"
  echo "$theirs"
  a=$(sed -n 's/.*decode_tok_s=\([0-9.]*\).*/\1/p' <<<"$ours")
  b=$(sed -n 's/.*decode_tok_s=\([0-9.]*\).*/\1/p' <<<"$theirs")
  echo "ratio context=$ctx helix/llama.cpp decode_tok_s = $(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.2f", a/b}')"
done
"$bench" --model "$model" --context 512 --batch 16 --steps 31 --warmup 0 --threads "$threads" \
  --kv-dtype float16 2>/dev/null
for b in 1 16; do
  "$bench" --model "$shared/models/stories260K/stories260K.bin" \
    --tokenizer "$shared/models/stories260K/tok512.bin" --context 256 --batch "$b" \
    --steps 199 --warmup 0 --threads "$threads" 2>/dev/null
done
