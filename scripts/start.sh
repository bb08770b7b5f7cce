#!/usr/bin/env bash
# Start napari with the Segment Anything widget docked (sets up .venv on first use).
# Arguments are files for napari to open, e.g. `bash scripts/start.sh stack.tif`.
# Without a display (a server, CI) the same session runs headless under xvfb-run and
# writes a screenshot instead.
# On Linux the system libraries Qt needs are checked first: if some are missing it prints
# the apt-get line and stops (exit 2); NAPARI_SAM_INSTALL_SYSTEM_DEPS=1 lets it install
# them (as root or through sudo). See scripts/headless_start.py --check-system.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
headless=1
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ] || [ "$(uname)" = "Darwin" ]; then
    headless=0
fi
if [ "$(uname)" = "Linux" ]; then
    check=(--check-system)
    [ "$headless" = 1 ] && check+=(--headless)
    .venv/bin/python scripts/headless_start.py "${check[@]}" || exit $?
fi
if [ "$headless" = 0 ]; then
    exec .venv/bin/napari "$@" -w napari-sam "Segment Anything"
fi
if ! command -v xvfb-run > /dev/null; then
    echo "No display and no xvfb-run: install Xvfb (apt-get install xvfb xauth) or run with a display." >&2
    exit 2
fi
echo "No display: running napari headless under xvfb-run."
exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/headless_start.py "$@"
