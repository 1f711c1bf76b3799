#!/usr/bin/env bash
# Install distsparse with its test dependencies into .venv (first run only), then run pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/install.sh"
cd "$ROOT"
exec "${DISTSPARSE_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
