"""scripts/start.sh checks Qt's system libraries before starting Qt (issue 10, item 1).

No root needed: a fake ``ldd`` first on PATH reports libraries as "not found", fake
``apt-get``/``sudo`` record what would be installed."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "headless_start.py"

LDD_MISSING = """\
\tlinux-vdso.so.1 (0x00007ffd)
\tlibQt6XcbQpa.so.6 => /venv/PyQt6/Qt6/lib/libQt6XcbQpa.so.6 (0x00007f01)
\tlibxcb-icccm.so.4 => not found
\tlibxcb-keysyms.so.1 => not found
\tlibxcb-icccm.so.4 => not found
\tlibxkbcommon-x11.so.0 => /lib/x86_64-linux-gnu/libxkbcommon-x11.so.0 (0x00007f02)
\tlibnapari-sam-nonexistent.so.7 => not found
"""


@pytest.fixture(scope="module")
def start():
    """scripts/headless_start.py as a module (its check part is standard library only)."""
    spec = importlib.util.spec_from_file_location("napari_sam_headless_start", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def fake_bin(tmp_path: Path, ldd_output: str | None = LDD_MISSING, installs: bool = False) -> Path:
    """A folder with a fake ``ldd`` (printing ``ldd_output`` until fake ``apt-get install``
    ran, if ``installs``), and fake ``apt-get``/``sudo`` logging their arguments."""
    folder = tmp_path / "bin"
    folder.mkdir()
    log, done = tmp_path / "calls.log", tmp_path / "installed"
    (folder / "ldd").write_text(
        "#!/bin/sh\n"
        f"[ -e '{done}' ] && exit 0\n"
        f"cat <<'END'\n{ldd_output}END\n")
    (folder / "apt-get").write_text(
        f"#!/bin/sh\necho \"apt-get $*\" >> '{log}'\n"
        + (f"[ \"$1\" = install ] && touch '{done}'\n" if installs else "") + "exit 0\n")
    (folder / "sudo").write_text(f"#!/bin/sh\necho \"sudo $*\" >> '{log}'\nexec \"$@\"\n")
    for f in folder.iterdir():
        f.chmod(0o755)
    return folder


def run_check(tmp_path, bin_dir, *args, env_extra=None, stdin=subprocess.DEVNULL):
    env = {k: v for k, v in os.environ.items()
           if k not in ("NAPARI_SAM_INSTALL_SYSTEM_DEPS", "CI")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(SCRIPT), "--check-system", *args], env=env,
                          stdin=stdin, capture_output=True, text=True, timeout=60)


def test_parse_ldd_reports_not_found_libraries_once(start):
    assert start.parse_ldd(LDD_MISSING) == [
        "libxcb-icccm.so.4", "libxcb-keysyms.so.1", "libnapari-sam-nonexistent.so.7"]
    assert start.parse_ldd("\tlibc.so.6 => /lib/libc.so.6 (0x1)\n") == []


def test_packages_for_sonames(start):
    packages, unknown = start.packages_for(start.parse_ldd(LDD_MISSING))
    assert packages == ["libxcb-icccm4", "libxcb-keysyms1"]
    assert unknown == ["libnapari-sam-nonexistent.so.7"]
    assert start.install_command(packages, root=True) == [
        "apt-get", "install", "-y", "--no-install-recommends", "libxcb-icccm4", "libxcb-keysyms1"]
    assert start.install_command(packages, root=False)[0] == "sudo"


def test_a_library_that_does_not_exist_is_found_missing(start, tmp_path):
    """The real ldd on a shared object that needs a library nobody has."""
    if not shutil.which("ldd") or not shutil.which("cc"):
        pytest.skip("needs ldd and a C compiler")
    (tmp_path / "dep.c").write_text("int napari_sam_dep(void) { return 1; }\n")
    (tmp_path / "use.c").write_text("int napari_sam_dep(void);\nint f(void) { return napari_sam_dep(); }\n")
    dep = tmp_path / "libnapari-sam-nonexistent.so.7"
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libnapari-sam-nonexistent.so.7",
                    "-o", str(dep), str(tmp_path / "dep.c")], check=True)
    use = tmp_path / "libuse.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(use), str(tmp_path / "use.c"), str(dep)],
                   check=True)
    dep.unlink()  # now the loader cannot find it
    assert start.missing_libraries([use]) == ["libnapari-sam-nonexistent.so.7"]


def test_this_machine_passes(start):
    """Where the GUI tests run, Qt's libraries and Xvfb are there: the check says nothing."""
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    assert start.qt_files(), "the venv's Qt binding was not found"
    result = subprocess.run([sys.executable, str(SCRIPT), "--check-system", "--headless"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_missing_libraries_print_the_apt_line_and_never_prompt_without_a_terminal(tmp_path):
    bin_dir = fake_bin(tmp_path)
    result = run_check(tmp_path, bin_dir)  # stdin is not a terminal: no prompt
    assert result.returncode == 2
    err = result.stderr
    assert "libxcb-icccm.so.4, libxcb-keysyms.so.1" in err
    assert re.search(r"^    (sudo )?apt-get install -y --no-install-recommends libxcb-icccm4 "
                     r"libxcb-keysyms1$", err, re.MULTILINE), err
    assert "NAPARI_SAM_INSTALL_SYSTEM_DEPS=1" in err and "libnapari-sam-nonexistent.so.7" in err
    assert "[y/N]" not in result.stdout + err
    assert not (tmp_path / "calls.log").exists()  # nothing installed


def test_install_only_with_the_opt_in(tmp_path):
    bin_dir = fake_bin(tmp_path, ldd_output=LDD_MISSING.replace(
        "\tlibnapari-sam-nonexistent.so.7 => not found\n", ""), installs=True)
    assert run_check(tmp_path, bin_dir, env_extra={"NAPARI_SAM_INSTALL_SYSTEM_DEPS": "0"}
                     ).returncode == 2
    assert not (tmp_path / "calls.log").exists()
    result = run_check(tmp_path, bin_dir, env_extra={"NAPARI_SAM_INSTALL_SYSTEM_DEPS": "1"})
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    calls = [c for c in calls if c.startswith("apt-get")]  # as root directly, else via sudo
    assert calls == ["apt-get update",
                     "apt-get install -y --no-install-recommends libxcb-icccm4 libxcb-keysyms1"]
    assert "installed" in result.stderr


def test_start_sh_stops_before_qt_with_the_apt_line(tmp_path):
    """The run command itself: a copy of the scripts around the real venv, set-up stubbed."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("start.sh", "headless_start.py"):
        shutil.copy(ROOT / "scripts" / name, repo / "scripts" / name)
    (repo / "scripts" / "setup_env.sh").write_text("exit 0\n")
    (repo / ".venv").symlink_to(Path(sys.executable).parents[1])
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "NAPARI_SAM_INSTALL_SYSTEM_DEPS")}
    env["PATH"] = f"{fake_bin(tmp_path)}{os.pathsep}{env['PATH']}"
    for display in ({}, {"DISPLAY": ":12345"}):
        result = subprocess.run(["bash", str(repo / "scripts" / "start.sh")], env={**env, **display},
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2, result.stderr
        assert "apt-get install -y --no-install-recommends libxcb-icccm4 libxcb-keysyms1" in result.stderr
        assert "headless" not in result.stdout  # stopped before xvfb-run / napari


def test_readme_and_ci_list_the_same_system_packages():
    """The README's install line for the run command names every package CI installs."""
    ci = (ROOT / ".ci" / "run").read_text()
    ci_packages = set(re.findall(r"\b(?:xvfb|xauth|lib[\w.+-]+)", ci.split("apt-get install", 1)[1]
                                 .split(">", 1)[0]))
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", readme, re.DOTALL) if "apt-get install" in b]
    assert blocks, "README has no apt-get install block"
    readme_packages = set(blocks[0].replace("\\\n", " ").split())
    assert ci_packages and ci_packages <= readme_packages, ci_packages - readme_packages
