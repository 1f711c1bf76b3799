#!/usr/bin/env bash
# Install into .venv on first run, then train the embedded default: GraNet-ST at 90 % sparsity,
# a small ResNet on Fashion-MNIST, one CPU process. Extra arguments are config overrides, e.g.
#   ./launch/quickstart.sh method.name=rigl run.name=rigl90
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/install.sh"
cd "$ROOT"
name="quickstart-$(date +%Y%m%d-%H%M%S)"
exec "${DISTSPARSE_VENV:-$ROOT/.venv}/bin/distsparse" train configs/quickstart.yaml "run.name=$name" "$@"
