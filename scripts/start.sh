#!/usr/bin/env bash
# Start napari with the Segment Anything widget docked (sets up .venv on first use).
# Arguments are files for napari to open, e.g. `bash scripts/start.sh stack.tif`.
# Without a display (a server, CI) the same session runs headless under xvfb-run and
# writes a screenshot instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ] || [ "$(uname)" = "Darwin" ]; then
    exec .venv/bin/napari "$@" -w napari-sam "Segment Anything"
fi
if ! command -v xvfb-run > /dev/null; then
    echo "No display and no xvfb-run: install Xvfb (apt-get install xvfb xauth) or run with a display." >&2
    exit 2
fi
echo "No display: running napari headless under xvfb-run."
exec xvfb-run -a .venv/bin/python scripts/headless_start.py "$@"
