#!/usr/bin/env bash
# Install distsparse and its dependencies into .venv (idempotent: a second run does nothing).
# torch and torchvision are installed as a matching pair from PyPI (--isolated skips the
# machine's local CPU-only torch wheel, whose ABI PyPI's torchvision does not match).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DISTSPARSE_VENV:-$ROOT/.venv}"
TORCH_PAIR=(torch==2.13.0 torchvision==0.28.0)
DEEPSPEED=deepspeed==0.19.8
FFCV=ffcv==1.0.2
FFCV_APT=(libopencv-dev libturbojpeg0-dev)
RAY='ray[default,train]==2.60.0'
FMNIST_DIR=/usr/share/datasets/fashion-mnist
FORTUNES_DIR=/usr/share/games/fortunes

stamp_key() { cat "$ROOT/pyproject.toml" "$ROOT/launch/install.sh" | sha256sum | cut -d' ' -f1; }

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

install_fashion_mnist() {
  [[ -f $FMNIST_DIR/train-images-idx3-ubyte.gz ]] && return 0
  echo "[install] Debian package dataset-fashion-mnist"
  if ! { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } >/dev/null; then
    echo "[install] warning: could not install dataset-fashion-mnist (needs apt and root); set data.path to the idx files" >&2
  fi
}

# The byte-level text corpus of the language-model recipes (data.name=fortunes).
install_fortunes() {
  [[ -f $FORTUNES_DIR/fortunes ]] && return 0
  echo "[install] Debian package fortunes"
  if ! { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes; } >/dev/null; then
    echo "[install] warning: could not install fortunes (needs apt and root); set data.path to a folder of text files" >&2
  fi
}

# FFCV builds against OpenCV and libjpeg-turbo: Debian packages, installed when missing.
install_ffcv_libraries() {
  dpkg -s "${FFCV_APT[@]}" >/dev/null 2>&1 && return 0
  echo "[install] Debian packages ${FFCV_APT[*]} (for FFCV)"
  if ! { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${FFCV_APT[@]}"; } >/dev/null; then
    echo "[install] warning: could not install ${FFCV_APT[*]} (needs apt and root); FFCV may fail to build, data.loader=torchvision works without it" >&2
  fi
}

install_fashion_mnist
install_fortunes
install_ffcv_libraries
if [[ -f $VENV/.distsparse-installed && $(cat "$VENV/.distsparse-installed") == "$(stamp_key)" ]]; then
  exit 0
fi
echo "[install] creating $VENV"
python3 -m venv "$VENV"
PIP=("$VENV/bin/pip" --disable-pip-version-check)
cert_args=()
[[ -n ${PIP_CERT:-} ]] && cert_args=(--cert "$PIP_CERT")
echo "[install] ${TORCH_PAIR[*]} (first run downloads several GB)"
"${PIP[@]}" install --isolated -q "${cert_args[@]}" "${TORCH_PAIR[@]}"
# DeepSpeed builds against the installed torch (no build isolation) and compiles its ops on first
# use (the CPU shm comm op needs g++), so it comes after torch and keeps it.
echo "[install] $DEEPSPEED"
DS_BUILD_OPS=0 "${PIP[@]}" install -q --no-build-isolation "${cert_args[@]}" "$DEEPSPEED"
# FFCV's dependency pytorch_pfn_extras would pull the newest torch: keep the installed pair.
echo "[install] $FFCV"
if ! "${PIP[@]}" install -q "${cert_args[@]}" "$FFCV" "${TORCH_PAIR[@]}"; then
  echo "[install] warning: $FFCV did not install; use data.loader=torchvision (FFCV tests skip, and fail under CI)" >&2
fi
# Ray after torch, with the torch pair pinned so that its resolver keeps the installed torch.
echo "[install] $RAY"
"${PIP[@]}" install -q "${cert_args[@]}" "$RAY" "${TORCH_PAIR[@]}"
echo "[install] distsparse and its dependencies"
"${PIP[@]}" install -q -e "$ROOT[test]"
stamp_key >"$VENV/.distsparse-installed"
echo "[install] done"
