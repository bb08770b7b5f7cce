#!/usr/bin/env bash
# Create .venv (if needed) with napari-sam and, with --testing, everything the tests need.
# torch is installed first, pinned, so that nothing pulls a multi-GB CUDA build by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${NAPARI_SAM_TORCH:-torch==2.13.0}
STAMP=.venv/.napari-sam-installed
digest="$(cat pyproject.toml scripts/setup_env.sh | sha1sum | cut -d' ' -f1)"
want="$digest ${1:-}"

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if [ -f "$STAMP" ]; then
    have="$(cat "$STAMP")"
    # up to date; a test environment also serves the plain one
    if [ "$have" = "$want" ] || [ "$have" = "$digest --testing" ]; then
        exit 0
    fi
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
if [ "${1:-}" = "--testing" ]; then
    .venv/bin/python -m pip install --quiet -e ".[testing]"
    # Reference implementations for parity tests (test-only, see tests/reference_shim.py):
    # torchvision without its CUDA deps, MobileSAM's code and what it imports.
    .venv/bin/python -m pip install --quiet --no-deps torchvision==0.28.0 mobilesam-mirror timm
    .venv/bin/python -m pip install --quiet pyyaml huggingface_hub safetensors
    # Clients of the drop-in API (tests/test_dropin_*.py): micro-sam and what it imports
    # (without its torch/torchvision pins), OpenCV and pycocotools for Meta's amg.py.
    .venv/bin/python -m pip install --quiet --no-deps torch-em micro-sam python-elf kornia kornia_rs imageio h5py
    .venv/bin/python -m pip install --quiet matplotlib xxhash bioimage-cpp scikit-learn \
        opencv-python-headless pycocotools
else
    .venv/bin/python -m pip install --quiet -e . PyQt6
fi
echo "$want" > "$STAMP"
