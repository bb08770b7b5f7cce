#!/usr/bin/env bash
# Run the whole test suite (sets up .venv on first use). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --testing
.venv/bin/npe2 validate napari-sam
exec .venv/bin/python -m pytest "$@"
