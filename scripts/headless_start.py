"""Helpers of ``scripts/start.sh``, run with the venv's Python.

``headless_start.py --check-system [--headless]``
    Before Qt starts (Linux): are the system libraries Qt's xcb platform plugin needs
    there? ``ldd`` on the venv's ``libqxcb.so`` (and the Qt modules napari loads) lists
    every shared library that is "not found"; headless, also Xvfb, xauth and Mesa's
    software OpenGL. If something is missing it prints the exact ``apt-get install`` line
    and exits 2, instead of Qt aborting with "could not load the Qt platform plugin xcb"
    (exit 134). It installs them only with consent: ``NAPARI_SAM_INSTALL_SYSTEM_DEPS=1``,
    or a "y" at a prompt that is shown only on an interactive terminal outside CI (as root,
    or through sudo). ``NAPARI_SAM_INSTALL_SYSTEM_DEPS=0`` never asks.
    Standard library only: nothing here imports Qt.

``headless_start.py [FILES…]``
    Headless equivalent of ``napari -w napari-sam "Segment Anything"``: open the given
    files (or a sample image), dock the plugin's widget from its manifest, save a
    screenshot.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

INSTALL_ENV_VAR = "NAPARI_SAM_INSTALL_SYSTEM_DEPS"

# shared library (soname) -> Debian/Ubuntu package providing it
SONAME_PACKAGES = {
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-xinerama.so.0": "libxcb-xinerama0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb.so.1": "libxcb1",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libX11.so.6": "libx11-6",
    "libXrender.so.1": "libxrender1",
    "libXi.so.6": "libxi6",
    "libSM.so.6": "libsm6",
    "libICE.so.6": "libice6",
    "libGL.so.1": "libgl1",
    "libGLX.so.0": "libglx0",
    "libOpenGL.so.0": "libopengl0",
    "libEGL.so.1": "libegl1",
    "libGLX_mesa.so.0": "libglx-mesa0",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libglib-2.0.so.0": "libglib2.0-0",
    "libgthread-2.0.so.0": "libglib2.0-0",
    "libdbus-1.so.3": "libdbus-1-3",
}
# programs a headless start needs -> package
PROGRAM_PACKAGES = {"xvfb-run": "xvfb", "Xvfb": "xvfb", "xauth": "xauth"}
MESA_DRI_PACKAGE = "libgl1-mesa-dri"  # software OpenGL (llvmpipe) for Xvfb

# the Qt bindings' xcb platform plugin and the Qt modules napari loads, relative to the
# binding's package folder
QT_FILES = {
    "PyQt6": ["Qt6/plugins/platforms/libqxcb.so", "QtWidgets.abi3.so", "QtOpenGLWidgets.abi3.so"],
    "PySide6": ["Qt/plugins/platforms/libqxcb.so", "QtWidgets.abi3.so", "QtOpenGLWidgets.abi3.so"],
    "PyQt5": ["Qt5/plugins/platforms/libqxcb.so", "QtWidgets.abi3.so", "QtOpenGL.abi3.so"],
}


def parse_ldd(output: str) -> list[str]:
    """Sonames that ``ldd`` reports as "not found", in order, without repeats."""
    missing: list[str] = []
    for line in output.splitlines():
        match = re.match(r"\s*(\S+)\s*=>\s*not found", line)
        if match and match.group(1) not in missing:
            missing.append(match.group(1))
    return missing


def qt_files() -> list[Path]:
    """The first installed Qt binding's xcb plugin and widget modules (without importing
    the binding: no Qt library is loaded); [] if no binding is installed."""
    for binding, relative in QT_FILES.items():
        spec = importlib.util.find_spec(binding)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        files = [root / r for r in relative if (root / r).is_file()]
        if files:
            return files
    return []


def missing_libraries(files: list[Path]) -> list[str]:
    """Sonames that ``files`` (shared objects) need and the dynamic loader cannot find."""
    ldd = shutil.which("ldd")
    if ldd is None or not files:
        return []
    missing: list[str] = []
    for path in files:
        result = subprocess.run([ldd, str(path)], capture_output=True, text=True)
        missing += [s for s in parse_ldd(result.stdout + result.stderr) if s not in missing]
    return missing


def _ldconfig_has(soname: str) -> bool | None:
    """Whether the loader cache knows ``soname`` (None: no ldconfig to ask)."""
    ldconfig = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.access(p, os.X_OK)), None)
    if ldconfig is None:
        return None
    result = subprocess.run([ldconfig, "-p"], capture_output=True, text=True)
    return any(line.split(" (")[0].strip() == soname for line in result.stdout.splitlines())


def _has_software_opengl() -> bool:
    """Mesa's software OpenGL driver (llvmpipe, what Xvfb renders with) is installed."""
    folders = glob.glob("/usr/lib/*/dri") + ["/usr/lib64/dri", "/usr/lib/dri"]
    names = ("swrast_dri.so", "libdril_dri.so")
    if any(os.path.exists(os.path.join(d, n)) for d in folders for n in names):
        return True
    return bool(glob.glob("/usr/lib/*/libgallium*.so") + glob.glob("/usr/lib64/libgallium*.so"))


def missing_headless() -> tuple[list[str], list[str]]:
    """What a headless start (Xvfb + Mesa software OpenGL) lacks: (what, packages)."""
    what = [p for p in ("xvfb-run", "xauth") if shutil.which(p) is None]
    packages = [PROGRAM_PACKAGES[p] for p in what]
    if _ldconfig_has("libGLX_mesa.so.0") is False:
        what.append("libGLX_mesa.so.0")
        packages.append(SONAME_PACKAGES["libGLX_mesa.so.0"])
    if not _has_software_opengl():
        what.append("Mesa's software OpenGL driver (swrast_dri.so)")
        packages.append(MESA_DRI_PACKAGE)
    return what, packages


def packages_for(sonames: list[str]) -> tuple[list[str], list[str]]:
    """(Debian packages providing ``sonames``, sonames of no known package)."""
    packages: list[str] = []
    unknown: list[str] = []
    for soname in sonames:
        package = SONAME_PACKAGES.get(soname)
        if package is None:
            unknown.append(soname)
        elif package not in packages:
            packages.append(package)
    return packages, unknown


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def install_command(packages: list[str], root: bool | None = None) -> list[str]:
    """``apt-get install`` of ``packages``, through sudo unless running as root."""
    return _sudo(root) + ["apt-get", "install", "-y", "--no-install-recommends", *packages]


def _sudo(root: bool | None = None) -> list[str]:
    return [] if (is_root() if root is None else root) else ["sudo"]


@dataclass
class Missing:
    """What keeps Qt (and, headless, Xvfb) from starting."""

    what: list[str]       # sonames and programs, for the message
    packages: list[str]   # Debian/Ubuntu packages providing them
    unknown: list[str]    # sonames of no known package

    @property
    def ok(self) -> bool:
        return not self.what


def find_missing(headless: bool) -> Missing:
    sonames = missing_libraries(qt_files())
    packages, unknown = packages_for(sonames)
    what = list(sonames)
    if headless:
        programs, extra = missing_headless()
        what += programs
        packages += [p for p in extra if p not in packages]
    return Missing(what, packages, unknown)


def _explain(missing: Missing, headline: str) -> None:
    def say(text: str) -> None:
        print(text, file=sys.stderr)

    say(f"napari-sam: {headline}: {', '.join(missing.what)}.")
    if missing.unknown:
        say(f"  No known Debian package provides {', '.join(missing.unknown)} "
            f"(`apt-file search {missing.unknown[0]}` finds it).")
    if missing.packages:
        say(f"Install them (Debian/Ubuntu) with:\n\n    {' '.join(install_command(missing.packages))}\n")


def _may_install(packages: list[str]) -> bool:
    """Consent to install: the env var, or "y" at a prompt on an interactive terminal
    outside CI. Never asks when stdin is not a terminal."""
    choice = os.environ.get(INSTALL_ENV_VAR, "").strip().lower()
    if choice in ("1", "yes", "true", "y"):
        return True
    if choice or os.environ.get("CI") or not (sys.stdin and sys.stdin.isatty()):
        return False
    if shutil.which("apt-get") is None or not (is_root() or shutil.which("sudo")):
        return False
    try:
        answer = input(f"Install them now with `{' '.join(install_command(packages))}`? [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _install(packages: list[str]) -> bool:
    """apt-get update + install (as root, or through sudo); True if both succeeded."""
    if shutil.which("apt-get") is None:
        print("napari-sam: no apt-get here: install them with your system's package manager.",
              file=sys.stderr)
        return False
    if not is_root() and shutil.which("sudo") is None:
        print("napari-sam: installing needs root (or sudo).", file=sys.stderr)
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    commands = [_sudo() + ["apt-get", "update"], install_command(packages)]
    print("napari-sam: running " + " && ".join(" ".join(c) for c in commands), file=sys.stderr)
    return all(subprocess.run(c, env=env).returncode == 0 for c in commands)


def check_system(headless: bool) -> int:
    """0 if Qt (and, headless, Xvfb) can start; else explain, install with consent, 2."""
    if not sys.platform.startswith("linux"):
        return 0
    missing = find_missing(headless)
    if missing.ok:
        return 0
    _explain(missing, "Qt cannot start, missing system libraries/programs")
    if not missing.packages:
        return 2
    if not _may_install(missing.packages):
        print(f"(or rerun with {INSTALL_ENV_VAR}=1 to let this script install them, as root or "
              "through sudo; the README lists every package napari needs on a headless box)",
              file=sys.stderr)
        return 2
    if not _install(missing.packages):
        return 2
    missing = find_missing(headless)
    if missing.ok:
        print("napari-sam: system packages installed.", file=sys.stderr)
        return 0
    _explain(missing, "still missing after the installation")
    return 2


def main(paths: list[str]) -> int:
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1600, 1000)
    if paths:
        viewer.open(paths)
    else:
        viewer.open_sample("napari-sam", "coins")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    for _ in range(20):  # let Qt lay out the dock before the screenshot
        QApplication.processEvents()
    viewer.reset_view()
    out = Path("napari-sam-screenshot.png").resolve()
    viewer.screenshot(str(out), canvas_only=False)
    print(f"napari-sam docked ({type(widget).__name__}); layers: {[l.name for l in viewer.layers]}")
    print(f"screenshot: {out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--check-system"]:
        sys.exit(check_system(headless="--headless" in sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
