#!/usr/bin/env bash
# Set up the project environment (idempotent) and run the whole test suite, slow end-to-end tests included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for a quick local run.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
cd "$repo"
export nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-0}" nnUNet_def_n_proc="${nnUNet_def_n_proc:-2}" nnUNet_compile="${nnUNet_compile:-false}"
exec "$repo/.venv/bin/python" -m pytest -ra "$@"
