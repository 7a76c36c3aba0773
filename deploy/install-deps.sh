#!/usr/bin/env bash
# Installs every build and test dependency of Helix: Debian 12 packages, then a Python virtual
# environment with the PyPI packages the tests use to write models (gguf: llama.cpp's own GGUF
# writer and quantisers; safetensors; numpy). Idempotent: packages already installed are
# skipped, apt is not touched when nothing is missing, pip not when the venv has everything.
# Run as root (or with sudo available).
#   HELIX_CACHE_DIR  where the venv and downloaded models live (default: ~/.cache/helix)
set -euo pipefail
cache=${HELIX_CACHE_DIR:-$HOME/.cache/helix}
venv="$cache/venv"
# Pinned: the test models and the reference dequantisation come from these exact versions.
py_packages=(gguf==0.19.0 numpy==2.4.6 safetensors==0.8.0 openai==3.57.0)

packages=(
  build-essential cmake ninja-build pkg-config git ca-certificates python3 python3-venv
  unzip curl
  libgrpc++-dev libgrpc-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  nlohmann-json3-dev libspdlog-dev libfmt-dev
  libucx-dev ucx-utils
  libgloo-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libcli11-dev libcpp-httplib-dev libabsl-dev
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

install_python() {
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" - "${py_packages[@]}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(any(version(p.split("==")[0]) != p.split("==")[1] for p in sys.argv[1:]))
PY
  then
    echo "install-deps: python venv $venv has ${py_packages[*]}"
    return
  fi
  echo "install-deps: python venv $venv: installing ${py_packages[*]}"
  mkdir -p "$cache"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${py_packages[@]}"
}

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  install_python
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-deps: missing packages (${missing[*]}) and not root; re-run as root" >&2
    exit 1
  fi
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
install_python
