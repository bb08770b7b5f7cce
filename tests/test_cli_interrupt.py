"""Ctrl-C anywhere in ``napari-sam``'s main: exit code 130 and one line, never a traceback.

The installed command is run and sent SIGINT while it is provably inside ``main``: it is
blocked reading a named pipe (a FIFO) that the test holds open — the input file while
reading it, or the checkpoint's fingerprint record while loading the model.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from test_cli_embed import NAPARI_SAM, random_vit_t_checkpoint

from napari_sam.engine.weights import _stamp_path


def start(args) -> subprocess.Popen:
    """``napari-sam *args`` with Ctrl-C acting as in a terminal. A test runner started in the
    background by a non-interactive shell ignores SIGINT, and a child inherits an ignored
    signal (Python then installs no KeyboardInterrupt handler); one handled here is reset to
    the default in the child."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([str(NAPARI_SAM), *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def interrupt_when_reading(fifo, args, timeout=120.0):
    """Run ``napari-sam *args``; once it opens ``fifo`` for reading, send SIGINT."""
    proc = start(args)
    deadline, fd = time.monotonic() + timeout, None
    try:
        while fd is None:  # a writer can open a FIFO without blocking only once a reader has
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                if proc.poll() is not None:
                    pytest.fail(f"exited before reading {fifo}: {proc.communicate()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"never read {fifo}")
                time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            # CPython acts on a signal between bytecodes: a SIGINT that lands after the last
            # check and before read() blocks waits for that read to return, as a real file's
            # read does (seen under load in CI). The FIFO's end of file returns it here; a
            # lost signal would then let the command go on with an empty file, and fail
            # this test: the input exits 2; the weights' record is opened again and blocks.
            os.close(fd)
            fd = None
            out, err = proc.communicate(timeout=60)
    finally:
        if fd is not None:
            os.close(fd)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


@pytest.mark.parametrize("command", ["everything", "embed"])
def test_ctrl_c_while_reading_the_input(tmp_path, command):
    fifo = tmp_path / "in.npy"
    os.mkfifo(fifo)
    out = ["-o", tmp_path / "o.tif"] if command == "everything" else ["--store", tmp_path / "s.zarr"]
    code, err = interrupt_when_reading(fifo, [command, fifo, *out, "--model", "vit_t"])
    assert code == 130, err
    assert err.strip().splitlines() == ["napari-sam: interrupted"]
    assert not (tmp_path / "o.tif").exists()


def test_ctrl_c_while_loading_the_model(tmp_path, tmp_path_factory):
    checkpoint = random_vit_t_checkpoint(tmp_path_factory)
    np.save(tmp_path / "img.npy", np.zeros((32, 32), np.uint8))
    stamp = _stamp_path(checkpoint)  # read by build_sam once the weights are loaded
    stamp.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(stamp)
    code, err = interrupt_when_reading(stamp, [
        "everything", tmp_path / "img.npy", "-o", tmp_path / "o.tif", "--model", "vit_t",
        "--checkpoint", checkpoint, "--device", "cpu"])
    assert code == 130, err
    assert err.strip().splitlines() == ["napari-sam: interrupted"]
    assert not (tmp_path / "o.tif").exists()


def test_ctrl_c_right_after_start(tmp_path):
    proc = start(["everything", tmp_path / "img.npy", "-o", tmp_path / "o.tif"])
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines() == ["napari-sam: interrupted"], err
