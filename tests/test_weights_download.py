"""Checkpoint download as a generator (engine.weights.download_job), offline: a local HTTP
server on 127.0.0.1 serves a small fake checkpoint, the registry entry points at it."""

from __future__ import annotations

import hashlib
import http.server
import itertools
import threading
import time
from pathlib import Path

import pytest

from napari_sam.engine import weights
from napari_sam.engine.volume import run_generator
from napari_sam.engine.weights import (
    CheckpointDownloadError,
    DownloadProgress,
    download_job,
)

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _Server:
    """Serves ``PAYLOAD`` at /fake.pt; ``delay_s`` after each ``block`` bytes, ``stall_after``
    bytes then silence until the test ends, ``cut_after`` bytes then a closed connection."""

    def __init__(self) -> None:
        self.delay_s, self.block, self.stall_after, self.cut_after = 0.0, 1 << 16, None, None
        self.release = threading.Event()
        self.requests = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                owner.requests += 1
                if self.path != "/fake.pt":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(PAYLOAD)))
                self.end_headers()
                try:
                    for start in range(0, len(PAYLOAD), owner.block):
                        if owner.stall_after is not None and start >= owner.stall_after:
                            owner.release.wait(30)
                            return
                        if owner.cut_after is not None and start >= owner.cut_after:
                            return
                        self.wfile.write(PAYLOAD[start : start + owner.block])
                        self.wfile.flush()
                        if owner.delay_s:
                            time.sleep(owner.delay_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fake.pt"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch, tmp_path):
    """A local server, the vit_t registry entry pointing at it, an empty cache folder."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path / "cache"))
    srv = _Server()
    set_entry(monkeypatch, srv.url, hashlib.sha256(PAYLOAD).hexdigest())
    yield srv
    srv.close()


def set_entry(monkeypatch, url: str, sha256: str) -> None:
    info = weights.CheckpointInfo("vit_t", url, len(PAYLOAD) + 123, sha256)  # size: a guess
    monkeypatch.setitem(weights.CHECKPOINTS, "vit_t", info)


def cache_files(tmp_path: Path) -> list[str]:
    """Files in the cache folder (not the fingerprint sidecars)."""
    folder = tmp_path / "cache"
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name != "fingerprints")


def test_download_yields_progress_and_returns_the_checked_file(server, tmp_path):
    server.delay_s, server.block = 0.02, 1 << 15  # 32 chunks, ~0.65 s
    job = download_job("vit_t")
    progress, times = [], []
    while True:
        try:
            progress.append(next(job))
            times.append(time.monotonic())
        except StopIteration as stop:
            path = stop.value
            break
    assert path == tmp_path / "cache" / "fake.pt" and path.read_bytes() == PAYLOAD
    assert all(isinstance(p, DownloadProgress) and p.model_type == "vit_t" for p in progress)
    assert progress[0].done_bytes == 0
    assert progress[-1].done_bytes == progress[-1].total_bytes == len(PAYLOAD)
    assert progress[1].total_bytes == len(PAYLOAD)  # the server's Content-Length, not the guess
    done = [p.done_bytes for p in progress]
    assert done == sorted(done) and len(set(done)) >= 3  # several steps in between
    assert max(b - a for a, b in itertools.pairwise(times)) < 0.5
    assert any(p.bytes_per_s > 0 for p in progress[1:])
    assert progress[-1].fraction == 1.0 and "MiB" in progress[-1].describe()
    assert cache_files(tmp_path) == ["fake.pt"]  # no temporary file left
    # hashed while downloading: the fingerprint is known without reading the file again
    assert weights.file_fingerprint(path) == hashlib.sha256(PAYLOAD).hexdigest()
    # second time: the cached file, no request, no progress
    requests = server.requests
    again = download_job("vit_t")
    assert run_generator(again) == path and server.requests == requests


def test_cancel_mid_download_stops_within_a_second_and_keeps_the_earlier_file(server, tmp_path):
    server.delay_s, server.block = 0.05, 1 << 14  # ~3 s in all
    (tmp_path / "cache").mkdir()
    earlier = tmp_path / "cache" / "fake.pt"
    earlier.write_bytes(b"an earlier (outdated) file")
    cancel = threading.Event()
    job = download_job("vit_t", cancel)
    for progress in job:
        if progress.done_bytes > 100_000:
            break
    assert 0 < progress.done_bytes < len(PAYLOAD)
    assert any(p.name.endswith(".part") for p in (tmp_path / "cache").iterdir())
    cancel.set()
    t0 = time.monotonic()
    with pytest.raises(StopIteration) as stop:
        while True:
            next(job)
    assert time.monotonic() - t0 < 1.0
    assert stop.value.value is None
    assert earlier.read_bytes() == b"an earlier (outdated) file"
    assert cache_files(tmp_path) == ["fake.pt"]  # the partial file is gone


def test_cancel_while_the_server_is_silent(server, tmp_path):
    """A stalled connection still yields progress (speed 0) and cancels at once."""
    server.stall_after = 1 << 17
    cancel = threading.Event()
    job = download_job("vit_t", cancel, timeout_s=30)
    seen, times = [], []
    for progress in job:
        seen.append(progress)
        times.append(time.monotonic())
        if len(seen) > 3 and progress.done_bytes == 1 << 17 and progress.bytes_per_s == 0:
            break
        assert time.monotonic() - times[0] < 10, "no stalled progress reported"
    assert max(b - a for a, b in itertools.pairwise(times)) < 0.5  # progress while stalled too
    cancel.set()
    t0 = time.monotonic()
    assert run_generator(job) is None
    assert time.monotonic() - t0 < 1.0
    assert cache_files(tmp_path) == []


def test_closing_the_generator_removes_the_partial_file(server, tmp_path):
    server.delay_s, server.block = 0.05, 1 << 14
    job = download_job("vit_t")
    for progress in job:
        if progress.done_bytes > 50_000:
            break
    job.close()
    assert cache_files(tmp_path) == []


def test_sha_mismatch_raises_and_keeps_the_earlier_file(server, monkeypatch, tmp_path):
    set_entry(monkeypatch, server.url, "0" * 64)
    (tmp_path / "cache").mkdir()
    earlier = tmp_path / "cache" / "fake.pt"
    earlier.write_bytes(b"earlier")
    with pytest.raises(CheckpointDownloadError) as err:
        run_generator(download_job("vit_t"))
    msg = str(err.value)
    assert "sha256 mismatch" in msg and hashlib.sha256(PAYLOAD).hexdigest() in msg
    assert server.url in msg and str(earlier) in msg and "NAPARI_SAM_CACHE" in msg
    assert earlier.read_bytes() == b"earlier"
    assert cache_files(tmp_path) == ["fake.pt"]


@pytest.mark.parametrize("case", ["cut", "404", "refused"])
def test_failed_downloads_leave_nothing(server, monkeypatch, tmp_path, case):
    if case == "cut":
        server.cut_after = 1 << 17
    elif case == "404":
        set_entry(monkeypatch, server.url.replace("fake.pt", "missing.pt"), "0" * 64)
    else:
        set_entry(monkeypatch, "http://127.0.0.1:9/fake.pt", "0" * 64)
    with pytest.raises(CheckpointDownloadError) as err:
        run_generator(download_job("vit_t"))
    msg = str(err.value)
    assert {"cut": "closed after 131072 of 1048576 bytes", "404": "404",
            "refused": "refused"}[case] in msg
    assert cache_files(tmp_path) == []


def test_fetch_checkpoint_drives_the_job_with_a_progress_bar(server, tmp_path, capsys):
    path = weights.fetch_checkpoint("vit_t")
    assert path.read_bytes() == PAYLOAD
    assert "download vit_t" in capsys.readouterr().err
    assert weights.fetch_checkpoint("vit_t", progressbar=False) == path


def test_unknown_model_type_is_refused_at_the_call():
    with pytest.raises(ValueError, match="model_type"):
        download_job("vit_x")


def test_progress_arithmetic():
    p = DownloadProgress(3 << 20, 12 << 20, 1 << 20, "vit_b")
    assert p.fraction == 0.25 and p.eta_s == 9.0
    assert p.describe() == "vit_b: 3.0 / 12.0 MiB, 1.0 MiB/s"
    assert DownloadProgress(0, 10, 0.0).eta_s is None
