#!/usr/bin/env bash
# Fills .devdeps, the ignored folder that tests/gpu/run_all.sh and run_engine.sh need on the lent
# GPU machine (which has nvcc, CMake, ninja and PyTorch but none of our Debian packages and no
# network). Run it here, on the Debian 12 dev machine, before the device call, then carry
# [".devdeps"]:
#   root/           the Debian packages below, unpacked (dpkg -x): GoogleTest's sources for the
#                   kernels-only build; Gloo, UCX (and their libraries) and nlohmann-json for the
#                   engine (-DHELIX_DEVICE_ENGINE=ON)
#   shared/models/stories260K   a copy of ../shared/models/stories260K (../shared does not travel)
#   test_models/    llama_BF16.gguf, llama_Q8_0.gguf, qwen2_F32.gguf from
#                   tests/models/make_test_models.py (the GPU machine has no gguf-py)
# Idempotent: each part is skipped when present (FORCE=1 redoes all). Needs apt-get download
# (Debian's archive reachable) and deploy/install-deps.sh's venv (run first if missing).
# Prints the folder's size last: the device tool carries at most 64 MiB.
#
#   bash tests/gpu/prepare_devdeps.sh      (from the repository root)
set -eu
cd "$(dirname "$0")/../.."
ROOT=$PWD
D=$ROOT/.devdeps
SHARED=${HELIX_SHARED_DIR:-$ROOT/../shared}
PY=${HELIX_VENV:-$HOME/.cache/helix/venv}/bin/python
PKGS=(googletest libgloo-dev libgloo0 libhiredis0.14 libibverbs1 libnl-3-200 libnl-route-3-200
  libucx-dev libucx0 libnuma1 nlohmann-json3-dev)
GGUFS=(llama_BF16.gguf llama_Q8_0.gguf qwen2_F32.gguf)

if [[ ${FORCE:-0} == 1 ]]; then
  rm -rf "$D"
fi
mkdir -p "$D"

# The Debian packages, unpacked. A stamp names the list, so a changed list unpacks again.
STAMP=$D/root/.packages
if [[ ! -f $STAMP || $(cat "$STAMP") != "${PKGS[*]}" ]]; then
  rm -rf "$D/root" "$D/debs"
  mkdir -p "$D/debs"
  (cd "$D/debs" && apt-get download "${PKGS[@]}")
  for f in "$D"/debs/*.deb; do
    dpkg -x "$f" "$D/root"
  done
  rm -rf "$D/debs"
  echo "${PKGS[*]}" > "$STAMP"
  echo "[prepare_devdeps] unpacked ${#PKGS[@]} packages into .devdeps/root"
fi

# stories260K (the engine tests' real model).
if [[ ! -f $D/shared/models/stories260K/stories260K.bin ]]; then
  if [[ ! -f $SHARED/models/stories260K/stories260K.bin ]]; then
    echo "[prepare_devdeps] no $SHARED/models/stories260K (set HELIX_SHARED_DIR)" >&2
    exit 1
  fi
  mkdir -p "$D/shared/models"
  cp -r "$SHARED/models/stories260K" "$D/shared/models/"
  echo "[prepare_devdeps] copied stories260K"
fi

# The GGUF test models (written with gguf-py, which only this machine has).
missing=0
for g in "${GGUFS[@]}"; do
  [[ -f $D/test_models/$g ]] || missing=1
done
if [[ $missing == 1 ]]; then
  if [[ ! -x $PY ]]; then
    bash "$ROOT/deploy/install-deps.sh"
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" "$ROOT/tests/models/make_test_models.py" "$tmp" "$SHARED" > "$tmp/log.txt" 2>&1 || {
    cat "$tmp/log.txt" >&2
    exit 1
  }
  mkdir -p "$D/test_models"
  for g in "${GGUFS[@]}"; do
    cp "$tmp/$g" "$D/test_models/"
  done
  echo "[prepare_devdeps] wrote ${GGUFS[*]}"
fi

size_kib=$(du -sk "$D" | cut -f1)
echo "[prepare_devdeps] .devdeps: $((size_kib / 1024)) MiB (the device tool carries at most 64)"
if ((size_kib > 60 * 1024)); then
  echo "[prepare_devdeps] too large to carry with the tree" >&2
  exit 1
fi
