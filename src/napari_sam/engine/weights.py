"""Official checkpoints: where they live, how big they are, their sha256, and the cache.

Files are fetched once and reused. :func:`download_job` is the download as a generator
(progress with size and speed, cancel within a second), for a napari worker or a test;
:func:`fetch_checkpoint` drives it with a terminal progress bar. Either way the file is
streamed into a temporary file in the cache folder, its sha256 checked, then renamed into
place: a half-written or wrong file never sits where a later run would pick it up, and an
earlier file at that path stays as it was until the new one is complete and correct.
The cache folder is ``$NAPARI_SAM_CACHE`` if set, else the platform's user cache folder.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import queue
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV_VAR = "NAPARI_SAM_CACHE"
PROGRESS_EVERY_S = 0.2  # a download yields progress at least this often (also while stalled)
CANCEL_POLL_S = 0.1     # and looks at its cancel event at least this often
STALL_TIMEOUT_S = 60.0  # no byte for this long (or no connection): the download fails


@dataclass(frozen=True)
class CheckpointInfo:
    """A published weights file.

    Attributes:
        model_type: its name in the registry ("vit_b", "vit_b_lm", "vit_b_lm_decoder").
        url: where it is downloaded from.
        size_bytes: its size when known (progress before the server says), else None.
        sha256: hex digest, for files whose publisher gives one (Meta, MobileSAM), or "".
        xxh128: hex digest, for files whose publisher gives one (micro-sam), or "".
        file_name: name in the cache folder ("" = the URL's last part).
    """

    model_type: str
    url: str
    size_bytes: int | None
    sha256: str = ""
    xxh128: str = ""
    file_name: str = ""

    def __post_init__(self) -> None:
        if bool(self.sha256) == bool(self.xxh128):
            raise ValueError(f"expected exactly one of sha256 / xxh128 for {self.model_type}, got "
                             f"sha256={self.sha256!r}, xxh128={self.xxh128!r}")

    @property
    def filename(self) -> str:
        return self.file_name or self.url.rsplit("/", 1)[-1]

    @property
    def digest_name(self) -> str:
        """"sha256" or "xxh128": the hash this file is checked with."""
        return "sha256" if self.sha256 else "xxh128"

    @property
    def digest(self) -> str:
        return self.sha256 or self.xxh128

    def new_hasher(self):
        """A hashlib-style object (update / hexdigest) for :attr:`digest_name`."""
        if self.sha256:
            return hashlib.sha256()
        try:
            import xxhash
        except ImportError:  # a runtime dependency; only a broken install lacks it
            raise CheckpointDownloadError(
                f"checking {self.filename} needs the xxhash package (pip install xxhash)") from None
        return xxhash.xxh128()


def _official(model_type: str, url: str, size_bytes: int, sha256: str) -> CheckpointInfo:
    return CheckpointInfo(model_type, url, size_bytes, sha256=sha256)


# micro-sam's model zoo: URLs and xxh128 hashes as published in micro-sam's
# micro_sam/util.py (models()); sizes are not published. Each model's AIS decoder is a
# separate file, "<name>_decoder". Cached as "<name>.pt" (many URLs end in ".../download").
_BIOIMAGE_IO = "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io"
_OWNCLOUD = "https://owncloud.gwdg.de/index.php/s"
_MICRO_SAM = {  # name: (model url, model xxh128, decoder url, decoder xxh128)
    "vit_t_lm": (f"{_BIOIMAGE_IO}/faithful-chicken/1.1/files/vit_t.pt", "72ec5074774761a6e5c05a08942f981e",
                 f"{_BIOIMAGE_IO}/faithful-chicken/1.1/files/vit_t_decoder.pt",
                 "3e914a5f397b0312cdd36813031f8823"),
    "vit_b_lm": (f"{_BIOIMAGE_IO}/diplomatic-bug/1.2/files/vit_b.pt", "fe9252a29f3f4ea53c15a06de471e186",
                 f"{_BIOIMAGE_IO}/diplomatic-bug/1.2/files/vit_b_decoder.pt",
                 "708b15ac620e235f90bb38612c4929ba"),
    "vit_l_lm": (f"{_BIOIMAGE_IO}/idealistic-rat/1.2/files/vit_l.pt", "017f20677997d628426dec80a8018f9d",
                 f"{_BIOIMAGE_IO}/idealistic-rat/1.2/files/vit_l_decoder.pt",
                 "2faeafa03819dfe03e7c46a44aaac64a"),
    "vit_t_em_organelles": (f"{_BIOIMAGE_IO}/greedy-whale/1/files/vit_t.pt",
                            "253474720c497cce605e57c9b1d18fd9",
                            f"{_BIOIMAGE_IO}/greedy-whale/1/files/vit_t_decoder.pt",
                            "8f897c7bb93174a4d1638827c4dd6f44"),
    "vit_b_em_organelles": (f"{_BIOIMAGE_IO}/noisy-ox/1.2/files/vit_b.pt",
                            "f3bf2ed83d691456bae2c3f9a05fb438",
                            f"{_BIOIMAGE_IO}/noisy-ox/1.2/files/vit_b_decoder.pt",
                            "bb6398956a6b0132c26b631c14f95ce2"),
    "vit_l_em_organelles": (f"{_BIOIMAGE_IO}/humorous-crab/1.2/files/vit_l.pt",
                            "810b084b6e51acdbf760a993d8619f2d",
                            f"{_BIOIMAGE_IO}/humorous-crab/1.2/files/vit_l_decoder.pt",
                            "334877640bfdaaabce533e3252a17294"),
    "vit_b_histopathology": (f"{_OWNCLOUD}/sBB4H8CTmIoBZsQ/download", "ffd1a2cd84570458b257bd95fdd8f974",
                             f"{_OWNCLOUD}/KO9AWqynI7SFOBj/download", "6a66194dcb6e36199cbee2214ecf7213"),
    "vit_l_histopathology": (f"{_OWNCLOUD}/IZgnn1cpBq2PHod/download", "b591833c89754271023e901281dee3f2",
                             f"{_OWNCLOUD}/oIs6VSmkOp7XrKF/download", "46aab7765d4400e039772d5a50b55c04"),
    "vit_h_histopathology": (f"{_OWNCLOUD}/L7AcvVz7DoWJ2RZ/download", "bd1856dafc156a43fb3aa705f1a6e92e",
                             f"{_OWNCLOUD}/1qAKxy5H0jgwZvM/download", "3ed9f87e46ad5e16935bd8d722c8dc47"),
    "vit_b_medical_imaging": (f"{_OWNCLOUD}/f5Ol4FrjPQWfjUF/download", "40169f1e3c03a4b67bff58249c176d92",
                              f"{_OWNCLOUD}/ahd3ZhZl2e0RIwz/download", "9e498b12f526f119b96c88be76e3b2ed"),
}


def _micro_sam_files() -> list[CheckpointInfo]:
    files = []
    for name, (url, digest, decoder_url, decoder_digest) in _MICRO_SAM.items():
        files.append(CheckpointInfo(name, url, None, xxh128=digest, file_name=f"{name}.pt"))
        files.append(CheckpointInfo(f"{name}_decoder", decoder_url, None, xxh128=decoder_digest,
                                    file_name=f"{name}_decoder.pt"))
    return files


CHECKPOINTS: dict[str, CheckpointInfo] = {
    info.model_type: info
    for info in (
        _official(
            "vit_b",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
            375_042_383,
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        ),
        _official(
            "vit_l",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
            1_249_524_607,
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        ),
        _official(
            "vit_h",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
            2_564_550_879,
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        ),
        _official(
            "vit_t",
            "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
            40_728_226,
            "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        ),
        *_micro_sam_files(),
    )
}


def decoder_name(model_type: str) -> str | None:
    """Name of the AIS decoder file published with ``model_type`` ("vit_b_lm" ->
    "vit_b_lm_decoder"), or None when there is none."""
    name = f"{model_type}_decoder"
    return name if name in CHECKPOINTS else None


class CheckpointDownloadError(RuntimeError):
    """The checkpoint could not be downloaded (offline, server error, bad hash…)."""


@dataclass(frozen=True)
class DownloadProgress:
    """Where a checkpoint download stands (yielded by :func:`download_job`).

    Attributes:
        done_bytes: bytes received so far (>= 0, never decreasing within one job).
        total_bytes: expected size in bytes (the server's Content-Length, else the
            registry's size), or 0 while unknown (micro-sam publishes no sizes).
        bytes_per_s: current speed, averaged over the last ~2 s (0.0 at the start and
            while stalled).
        model_type: which checkpoint ("vit_t", …).
    """

    done_bytes: int
    total_bytes: int
    bytes_per_s: float
    model_type: str = ""

    @property
    def fraction(self) -> float:
        """done / total in [0, 1]."""
        return min(1.0, self.done_bytes / self.total_bytes) if self.total_bytes > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current speed; None while the speed or size is unknown."""
        if self.bytes_per_s <= 0 or self.total_bytes <= 0:
            return None
        return max(0, self.total_bytes - self.done_bytes) / self.bytes_per_s

    def describe(self) -> str:
        """One line for a status bar, e.g. ``vit_t: 12.3 / 38.8 MiB, 4.1 MiB/s``."""
        mib = 1 << 20
        text = f"{self.done_bytes / mib:.1f}"
        text += f" / {self.total_bytes / mib:.1f} MiB" if self.total_bytes > 0 else " MiB"
        if self.bytes_per_s > 0:
            text += f", {self.bytes_per_s / mib:.1f} MiB/s"
        return f"{self.model_type}: {text}" if self.model_type else text


def cache_dir() -> Path:
    """Folder holding downloaded checkpoints (created on demand)."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("napari-sam")) / "checkpoints"


def checkpoint_info(model_type: str) -> CheckpointInfo:
    try:
        return CHECKPOINTS[model_type]
    except KeyError:
        raise ValueError(f"expected model_type in {sorted(CHECKPOINTS)}, got {model_type!r}") from None


def cached_checkpoint_path(model_type: str) -> Path:
    """Where the official file for ``model_type`` is (or would be) in the cache."""
    return cache_dir() / checkpoint_info(model_type).filename


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    """Sidecar in the cache folder (never beside the user's own files)."""
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()
    return cache_dir() / "fingerprints" / f"{key}.json"


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _saved_digests(path: Path) -> dict[str, str]:
    """Digests remembered for ``path`` ({"sha256": …, "xxh128": …}) if its size and mtime
    are unchanged since, else {}."""
    try:
        saved = json.loads(_stamp_path(path).read_text())
        stamp = _stamp(path)
        if {k: saved.get(k) for k in stamp} == stamp:
            return {k: v for k, v in saved.items() if k in ("sha256", "xxh128") and v}
    except (OSError, ValueError):
        pass
    return {}


def _remember_fingerprint(path: Path, digest: str, kind: str = "sha256") -> None:
    try:
        stamp_file = _stamp_path(path)
        stamp_file.parent.mkdir(parents=True, exist_ok=True)
        known = {**_saved_digests(path), kind: digest}
        stamp_file.write_text(json.dumps({**_stamp(path), **known}))
    except OSError:  # read-only folder: fine, we just hash again next time
        pass


def file_fingerprint(path: str | Path) -> str:
    """sha256 of ``path``, remembered in the cache folder (keyed by path, size and mtime) so
    that multi-GB checkpoints are hashed once, not on every start."""
    path = Path(path)
    saved = _saved_digests(path).get("sha256")
    if saved:
        return saved
    digest = sha256_of(path)
    _remember_fingerprint(path, digest)
    return digest


def _holds(path: Path, info: CheckpointInfo) -> bool:
    """``path`` is a file with ``info``'s published digest (remembered after one hashing)."""
    if not path.is_file():
        return False
    if info.sha256:
        return file_fingerprint(path) == info.sha256
    digest = _saved_digests(path).get("xxh128")
    if digest is None:
        hasher = info.new_hasher()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                hasher.update(block)
        digest = hasher.hexdigest()
        _remember_fingerprint(path, digest, "xxh128")
    return digest == info.xxh128


def _download_error(info: CheckpointInfo, target: Path, reason: str) -> CheckpointDownloadError:
    """One clear message: what failed, where to put the file by hand, the env var."""
    argument = "decoder_checkpoint=" if info.model_type.endswith("_decoder") else "checkpoint="
    return CheckpointDownloadError(
        f"could not download the {info.model_type} checkpoint from {info.url} "
        f"({reason}). Download it yourself and save it as "
        f"{target} (or pass its path as `{argument}`); set ${CACHE_ENV_VAR} to use "
        "another cache folder."
    )


class _Reader(threading.Thread):
    """Opens ``url`` and puts ("open", length | None), ("data", bytes)…, then ("end", None)
    or ("error", exception) into ``self.queue``. A thread, so that a blocking connect or
    read (a stalled server) never delays the consumer's cancel; it stops at its next
    chunk once ``stop`` is set (a daemon: a read stalled forever cannot keep Python alive)."""

    def __init__(self, url: str, chunk_bytes: int, timeout_s: float) -> None:
        super().__init__(name="napari-sam-download", daemon=True)
        self.url, self.chunk_bytes, self.timeout_s = url, chunk_bytes, timeout_s
        self.queue: queue.Queue = queue.Queue(maxsize=64)  # bounded: <= 64 chunks in memory
        self.stop = threading.Event()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=CANCEL_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            request = urllib.request.Request(self.url, headers={"User-Agent": "napari-sam"})
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                length = response.headers.get("Content-Length", "")
                if not self._put(("open", int(length) if length.isdigit() else None)):
                    return
                while not self.stop.is_set():
                    block = response.read1(self.chunk_bytes)  # what has arrived, <= chunk
                    if not block:
                        self._put(("end", None))
                        return
                    if not self._put(("data", block)):
                        return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer as it is
            self._put(("error", exc))


class _Speed:
    """Bytes per second over a sliding window of ``window_s``."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self.samples: collections.deque = collections.deque()  # (time, done_bytes)

    def update(self, now: float, done: int) -> float:
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        t0, d0 = self.samples[0]
        return (done - d0) / (now - t0) if now - t0 >= 0.05 else 0.0


def download_job(
    model_type: str,
    cancel: threading.Event | None = None,
    *,
    chunk_bytes: int = 1 << 16,
    timeout_s: float = STALL_TIMEOUT_S,
) -> Generator[DownloadProgress, None, Path | None]:
    """The published file ``model_type``, downloaded into the cache, as a generator.

    Checked up front (raised by this call, before any download): ``model_type`` is known
    (ValueError). Then, when iterated: if the cache already holds the file with the
    published hash (sha256 or xxh128), it returns its path at once (no progress at all). Otherwise it yields a
    :class:`DownloadProgress` at the start, at least every ``PROGRESS_EVERY_S`` (0.2 s,
    also while the server is silent) and once at the end (``done_bytes == total_bytes``),
    streams the file into a temporary file beside the target, checks its published hash
    and renames it into place (atomic), then returns the path.

    Cancel: set ``cancel`` (checked every 0.1 s) or close the generator. It stops reading
    within a second, removes its temporary file and returns None; a file that was at the
    target path before stays as it was.

    Args:
        model_type: a key of :data:`CHECKPOINTS`: "vit_b", "vit_l", "vit_h", "vit_t",
            micro-sam's "vit_b_lm", … and their AIS decoders "vit_b_lm_decoder", ….
        cancel: optional ``threading.Event``; when set, the job returns None.
        chunk_bytes: most bytes read from the network at a time.
        timeout_s: a connection that sends nothing for this long fails.
    Returns (as the generator's value): the checkpoint's path, or None if cancelled.
    Raises (while iterated):
        CheckpointDownloadError: offline, HTTP error, stalled or cut connection, hash
            mismatch, cache folder not writable; the message names the URL, the exact
            path where the file can be put by hand, and ``$NAPARI_SAM_CACHE``.
    """
    info = checkpoint_info(model_type)
    if chunk_bytes < 1:
        raise ValueError(f"expected chunk_bytes >= 1, got {chunk_bytes}")
    return _download(info, cache_dir() / info.filename, cancel, chunk_bytes, timeout_s)


def _download(info: CheckpointInfo, target: Path, cancel, chunk_bytes: int, timeout_s: float
              ) -> Generator[DownloadProgress, None, Path | None]:
    if _holds(target, info):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{info.filename}.",
                                        suffix=".part")
    except OSError as exc:
        raise _download_error(info, target, f"cannot write to {target.parent}: {exc}") from exc
    tmp = Path(tmp_name)
    reader = _Reader(info.url, chunk_bytes, timeout_s)
    finished = False
    try:
        with os.fdopen(fd, "wb") as out:
            # sha256 always (the file's identity in cache keys), the publisher's hash too
            sha256, published, done = hashlib.sha256(), info.new_hasher(), 0
            total = info.size_bytes or 0  # 0: unknown until the server says
            length: int | None = None
            speed, start = _Speed(), time.monotonic()
            speed.update(start, 0)
            last_yield = start
            reader.start()
            yield DownloadProgress(0, total, 0.0, info.model_type)
            while True:
                if cancel is not None and cancel.is_set():
                    return None
                try:
                    kind, value = reader.queue.get(timeout=CANCEL_POLL_S)
                except queue.Empty:
                    kind, value = "wait", None
                if kind == "open":
                    length = value
                    total = value or info.size_bytes or 0
                elif kind == "data":
                    try:
                        out.write(value)
                    except OSError as exc:
                        raise _download_error(info, target, f"cannot write {tmp}: {exc}") from exc
                    sha256.update(value)
                    if info.xxh128:
                        published.update(value)
                    done += len(value)
                elif kind == "error":
                    raise _download_error(info, target, f"{type(value).__name__}: {value}") from value
                elif kind == "end":
                    break
                now = time.monotonic()
                if now - last_yield >= PROGRESS_EVERY_S:
                    last_yield = now
                    yield DownloadProgress(done, max(total, done) if total else 0, speed.update(now, done),
                                           info.model_type)
            if length is not None and done != length:
                raise _download_error(info, target, f"the connection closed after {done} of "
                                      f"{length} bytes")
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as exc:
                raise _download_error(info, target, f"cannot write {tmp}: {exc}") from exc
        elapsed = max(time.monotonic() - start, 1e-9)
        yield DownloadProgress(done, done, done / elapsed, info.model_type)
        got = (sha256 if info.sha256 else published).hexdigest()
        if got != info.digest:
            raise _download_error(
                info, target, f"{info.digest_name} mismatch: got {got}, expected "
                f"{info.digest}; a proxy or a changed file on the server? Nothing was saved")
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise _download_error(info, target, f"cannot rename {tmp}: {exc}") from exc
        finished = True
        # hashed while downloading: not again
        _remember_fingerprint(target, sha256.hexdigest())
        if info.xxh128:
            _remember_fingerprint(target, info.xxh128, "xxh128")
        return target
    finally:
        reader.stop.set()
        if not finished:
            tmp.unlink(missing_ok=True)


def model_files_job(model_type: str, cancel: threading.Event | None = None
                    ) -> Generator[DownloadProgress, None, tuple[Path, Path | None] | None]:
    """:func:`download_job` for a model's weights and then its AIS decoder, where micro-sam
    publishes one. Returns ``(checkpoint, decoder or None)``, or None if cancelled."""
    path = yield from download_job(model_type, cancel)
    if path is None:
        return None
    decoder = decoder_name(model_type)
    if decoder is None:
        return path, None
    try:
        decoder_path = yield from download_job(decoder, cancel)
    except CheckpointDownloadError as exc:  # the model still segments interactively (and AMG)
        warnings.warn(f"{model_type} loads without its AIS decoder: {exc}", stacklevel=2)
        return path, None
    return None if decoder_path is None else (path, decoder_path)


def fetch_checkpoint(model_type: str, progressbar: bool = True) -> Path:
    """Path of the official checkpoint for ``model_type``, downloading it once if needed
    (with a terminal progress bar on stderr unless ``progressbar`` is False).

    Raises:
        CheckpointDownloadError: offline or failed download; the message names the URL,
            the exact path where the file can be put by hand, and ``$NAPARI_SAM_CACHE``.
    """
    job = download_job(model_type)
    bar = None
    try:
        while True:
            try:
                progress = next(job)
            except StopIteration as stop:
                return stop.value
            if progressbar:
                if bar is None:
                    from tqdm import tqdm

                    bar = tqdm(total=progress.total_bytes, unit="B", unit_scale=True,
                               unit_divisor=1024, desc=f"download {model_type}", file=sys.stderr)
                bar.total = progress.total_bytes
                bar.update(progress.done_bytes - bar.n)
    finally:
        job.close()
        if bar is not None:
            bar.close()
