"""Official checkpoints: where they live, how big they are, their sha256, and the cache.

Files are fetched once with pooch (download to a temporary file in the cache folder,
sha256 check, atomic rename — a half-written file never sits in the cache) and reused.
The cache folder is ``$NAPARI_SAM_CACHE`` if set, else the platform's user cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV_VAR = "NAPARI_SAM_CACHE"


@dataclass(frozen=True)
class CheckpointInfo:
    """An official checkpoint file."""

    model_type: str
    url: str
    size_bytes: int
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


CHECKPOINTS: dict[str, CheckpointInfo] = {
    info.model_type: info
    for info in (
        CheckpointInfo(
            "vit_b",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
            375_042_383,
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        ),
        CheckpointInfo(
            "vit_l",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
            1_249_524_607,
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        ),
        CheckpointInfo(
            "vit_h",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
            2_564_550_879,
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        ),
        CheckpointInfo(
            "vit_t",
            "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
            40_728_226,
            "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        ),
    )
}


class CheckpointDownloadError(RuntimeError):
    """The checkpoint could not be downloaded (offline, server error, bad hash…)."""


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


def file_fingerprint(path: str | Path) -> str:
    """sha256 of ``path``, remembered in the cache folder (keyed by path, size and mtime) so
    that multi-GB checkpoints are hashed once, not on every start."""
    path = Path(path)
    stamp_file = _stamp_path(path)
    stamp = _stamp(path)
    try:
        saved = json.loads(stamp_file.read_text())
        if {k: saved.get(k) for k in stamp} == stamp and saved.get("sha256"):
            return saved["sha256"]
    except (OSError, ValueError):
        pass
    digest = sha256_of(path)
    try:
        stamp_file.parent.mkdir(parents=True, exist_ok=True)
        stamp_file.write_text(json.dumps({**stamp, "sha256": digest}))
    except OSError:  # read-only folder: fine, we just hash again next time
        pass
    return digest


def fetch_checkpoint(model_type: str, progressbar: bool = True) -> Path:
    """Path of the official checkpoint for ``model_type``, downloading it once if needed.

    Raises:
        CheckpointDownloadError: offline or failed download; the message names the URL,
            the exact path where the file can be put by hand, and ``$NAPARI_SAM_CACHE``.
    """
    info = checkpoint_info(model_type)
    target = cache_dir() / info.filename
    if target.is_file() and file_fingerprint(target) == info.sha256:
        return target
    import pooch

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        path = pooch.retrieve(
            url=info.url,
            known_hash=f"sha256:{info.sha256}",
            fname=info.filename,
            path=target.parent,
            progressbar=progressbar,
        )
    except Exception as exc:  # network, HTTP, disk full, hash mismatch: one clear message
        raise CheckpointDownloadError(
            f"could not download the {model_type} checkpoint from {info.url} "
            f"({type(exc).__name__}: {exc}). Download it yourself and save it as "
            f"{target} (or pass its path as `checkpoint=`); set ${CACHE_ENV_VAR} to use "
            "another cache folder."
        ) from exc
    return Path(path)
