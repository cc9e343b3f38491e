#!/usr/bin/env bash
# Create (once) the project virtual environment in .venv and install nnunet-feddah with its test extra.
# Idempotent: a second run with an unchanged pyproject.toml installs nothing.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FEDDAH_VENV:-$repo/.venv}"
stamp="$venv/.feddah-install-stamp"
want="$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$venv/bin/python" -c "import nnunet_feddah, nnunetv2, flwr, torch" 2>/dev/null; then
  echo "[setup] $venv is up to date (nothing to install)"
  exit 0
fi

PY="${PYTHON:-python3}"
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"'
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
start=$(date +%s)
echo "[setup] installing nnunet-feddah and its dependencies into $venv (first run: ~2 min)"
# A plain install lets pip pick a matching torch/torchvision pair (do not pin the CPU-only torch wheel:
# its torchvision breaks nnU-Net's trainer lookup, see docs/INSTALL.md).
"$venv/bin/python" -m pip install --quiet -e "$repo[test]"
echo "$want" > "$stamp"
echo "[setup] done in $(( $(date +%s) - start )) s"
