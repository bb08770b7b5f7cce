"""Large data from the command line: OME-Zarr in (NGFF 0.4 / 0.5, any level), OME-Zarr labels
and chunked zarr labels out, lazy inputs, tiling flags, and peak memory bounded on a volume.

Geometry is checked in-process with the oracle (its AIS decoder returns perfect maps of the
objects it was shown); formats, refusals and memory with the installed ``napari-sam``
command and random vit_t weights, as a user runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from typing import ClassVar

import numpy as np
import pytest
import rss
import tifffile
import zarr
from conftest import patch_build_sam
from oracle import OracleSam, with_instance_decoder
from test_automatic_oracle import draw_objects, iou
from test_cli_embed import NAPARI_SAM, napari_sam, random_vit_t_checkpoint

from napari_sam._cli.files import AxisView, read_stack, read_tiff
from napari_sam.cli import main
from napari_sam.engine.tiling import TileGrid

TYPES = {"t": "time", "c": "channel"}
AIS = ["--model", "vit_t_lm", "--mode", "ais"]  # with the oracle: its perfect AIS decoder
AMG = ["--mode", "amg", "--points-per-side", "2", "--pred-iou-thresh", "0",
       "--stability-score-thresh", "0", "--quiet"]  # random weights: keep every mask


def write_ome_zarr(path, data, axes: str, version: str = "0.4", n_levels: int = 2,
                   scale=None, translation=None) -> list[np.ndarray]:
    """An OME-Zarr image of ``data`` (axes e.g. "czyx", NGFF order) as another tool writes
    it: level k is level 0 taken every 2**k pixels in y and x, its scale metadata
    ``scale * 2**k`` there; NGFF 0.4 -> zarr format 2 + .zattrs, 0.5 -> zarr format 3 +
    zarr.json ``attributes.ome``. Returns the levels."""
    fmt = 2 if version == "0.4" else 3
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    scale = list(scale or [1.0] * len(axes))
    levels, datasets = [], []
    for k in range(n_levels):
        level = data[..., :: 2**k, :: 2**k]
        extra = {"dimension_names": list(axes)} if fmt == 3 else {}
        chunks = tuple(1 if a not in "yx" else min(s, 64) for a, s in zip(axes, level.shape))
        group.create_array(str(k), shape=level.shape, chunks=chunks, dtype=level.dtype, **extra)[...] = level
        level_scale = [s * (2**k if a in "yx" else 1) for a, s in zip(axes, scale)]
        transforms = [{"type": "scale", "scale": level_scale}]
        if translation is not None:
            transforms.append({"type": "translation", "translation": list(translation)})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
        levels.append(level)
    multiscale = {"name": "image", "axes": [{"name": a, "type": TYPES.get(a, "space")} for a in axes],
                  "datasets": datasets}
    if fmt == 2:
        group.attrs["multiscales"] = [{"version": "0.4", **multiscale}]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    return levels


def image_files(path) -> dict:
    """{relative path: sha256} of every file of an OME-Zarr image outside labels/."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and "labels" not in p.relative_to(path).parts}


def attributes(path) -> dict:
    if (path / "zarr.json").exists():
        return json.loads((path / "zarr.json").read_text())["attributes"]
    return json.loads((path / ".zattrs").read_text())


def ome(attrs: dict) -> dict:
    return attrs.get("ome", attrs)


def best_iou(labels: np.ndarray, mask: np.ndarray) -> float:
    values, counts = np.unique(labels[mask], return_counts=True)
    top = values[np.argmax(counts)]
    return 0.0 if top == 0 else iou(labels == top, mask)


@pytest.fixture
def ais_oracle(monkeypatch):
    """``build_sam`` returns the oracle with its AIS decoder (input size 256)."""
    return patch_build_sam(monkeypatch, with_instance_decoder(OracleSam(256)))


def objects_stack():
    """(3, 200, 240) uint8 stack of 9 objects (slice 2 shifted right by 6 pixels) and the
    (9, 200, 240) truth masks of slices 0-1."""
    image, truth = draw_objects((200, 240), grid=(3, 3), seed=4, radius=(10, 24))
    return np.stack([image, image, np.roll(image, 6, axis=1)]), truth


# ---------------------------------------------------------------- OME-Zarr, in-process (geometry)
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_labels_lie_over_the_image_at_every_level(tmp_path, ais_oracle, capsys, version):
    stack, truth = objects_stack()
    path = tmp_path / "img.ome.zarr"
    levels = write_ome_zarr(path, stack[None], "czyx", version, scale=[1, 2.0, 0.5, 0.5],
                            translation=[0, 10.0, 3.0, 4.0])
    before = image_files(path)
    assert main(["everything", str(path), *AIS, "--quiet"]) == 0
    assert "9 objects in" in capsys.readouterr().err  # linked through the stack

    group = path / "labels" / "napari-sam"
    assert ome(attributes(path / "labels"))["labels"] == ["napari-sam"]
    meta = ome(attributes(group))
    multiscale = meta["multiscales"][0]
    image_ms = ome(attributes(path))["multiscales"][0]
    assert multiscale["axes"] == image_ms["axes"]
    assert multiscale["datasets"] == image_ms["datasets"]  # same levels, scales, translations
    assert meta["image-label"]["source"] == {"image": "../../"}
    assert (version == "0.4") == (meta["image-label"].get("version") == "0.4")
    labels = [zarr.open_array(str(group / str(k)), mode="r") for k in range(2)]
    assert [a.shape for a in labels] == [(1, *lv.shape[1:]) for lv in levels]  # channel axis 1
    assert labels[0].dtype == np.uint32 and labels[0].metadata.zarr_format == (2 if version == "0.4" else 3)
    if version == "0.5":
        assert list(labels[0].metadata.dimension_names) == ["c", "z", "y", "x"]
    full = labels[0][0]
    for z in (0, 1):
        assert all(best_iou(full[z], t) >= 0.9 for t in truth)
    assert all(best_iou(full[2], np.roll(t, 6, axis=1)) >= 0.9 for t in truth)
    assert len(np.unique(full)) - 1 == 9  # linked: one id per object through the stack
    half = labels[1][0]  # nearest-neighbour level 1 of the level-0 labels
    assert np.array_equal(half, full[:, 1::2, 1::2])
    assert image_files(path) == before  # the image's arrays and metadata untouched


def test_ome_zarr_segmented_at_a_coarser_level(tmp_path, ais_oracle):
    stack, truth = objects_stack()
    path = tmp_path / "img.zarr"
    write_ome_zarr(path, stack[None], "czyx", "0.5", n_levels=3)
    assert main(["everything", str(path), *AIS, "--level", "1", "--ome-labels", "coarse",
                 "--quiet"]) == 0
    group = path / "labels" / "coarse"
    assert ome(attributes(path / "labels"))["labels"] == ["coarse"]
    labels = [zarr.open_array(str(group / str(k)), mode="r")[0] for k in range(3)]
    assert [a.shape[1:] for a in labels] == [(200, 240), (100, 120), (50, 60)]
    assert attributes(group)["napari-sam"]["level"] == 1
    for t in truth:  # segmented at level 1; level 0 resampled from it, level 2 too
        assert best_iou(labels[1][0], t[::2, ::2]) >= 0.85
        assert best_iou(labels[0][0], t) >= 0.8


def test_ome_zarr_channels_levels_and_names_are_checked_before_the_model(tmp_path, ais_oracle, capsys):
    stack, _ = objects_stack()
    path = tmp_path / "img.zarr"
    write_ome_zarr(path, np.stack([stack, stack // 2]), "czyx", "0.4")
    cases = {
        (): "got 2 in img.zarr (axis c): pick one with --channel K",
        ("--channel", "2"): "expected --channel in [0, 1], got 2",
        ("--channel", "0", "--level", "2"): "expected --level in [0, 1]",
        ("--channel", "0", "--ome-labels", ".hidden"): "expected a label name",
        ("--channel", "0", "-o", str(path / "labels" / "x.zarr")): "inside it",
        ("--channel", "0", "-o", str(tmp_path / "o.tif"), "--ome-labels", "a"): "either -o/--output or --ome-labels",
    }
    for extra, message in cases.items():
        assert main(["everything", str(path), *extra, "--quiet"]) == 2, extra
        assert message in capsys.readouterr().err, extra
    tifffile.imwrite(tmp_path / "img.tif", stack)
    for extra, message in {(): "expected -o/--output LABELS", ("--level", "1", "-o", str(tmp_path / "o.tif")):
                           "expected --level only with an OME-Zarr"}.items():
        assert main(["everything", str(tmp_path / "img.tif"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert ais_oracle.build_calls == [] and not (path / "labels").exists()
    assert main(["everything", str(path), "--channel", "1", *AIS, "--quiet"]) == 0
    assert zarr.open_array(str(path / "labels" / "napari-sam" / "0"), mode="r").shape == (1, 3, 200, 240)


def test_an_interrupted_run_leaves_the_earlier_outputs_and_no_temporary(tmp_path, ais_oracle, monkeypatch):
    stack, _ = objects_stack()
    path = tmp_path / "img.zarr"
    write_ome_zarr(path, stack[None], "czyx", "0.4")
    assert main(["everything", str(path), *AIS, "--quiet"]) == 0
    assert main(["everything", str(path), *AIS, "-o", str(tmp_path / "l.zarr"), "--quiet"]) == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    from napari_sam.engine import instances

    calls = []
    original = instances.SamInstanceSegmenter.job

    def interrupted(self, *args, **kwargs):  # Ctrl-C while slice 2 is segmented
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return (yield from original(self, *args, **kwargs))

    monkeypatch.setattr(instances.SamInstanceSegmenter, "job", interrupted)
    for extra in (["--overwrite"], ["--overwrite", "-o", str(tmp_path / "l.zarr")],
                  ["-o", str(tmp_path / "l.tif")]):
        calls.clear()
        assert main(["everything", str(path), *AIS, "--quiet", *extra]) == 130
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # earlier labels intact, nothing half-written, no temporaries


def test_embed_reads_ome_zarr_and_everything_uses_its_store(tmp_path, ais_oracle):
    stack, truth = objects_stack()
    path = tmp_path / "img.zarr"
    write_ome_zarr(path, stack[None], "czyx", "0.5")
    assert main(["embed", str(path), "--store", str(tmp_path / "s.zarr"), "--model", "vit_t_lm", "--quiet"]) == 0
    assert ais_oracle.encode_calls == 3
    assert main(["everything", str(path), *AIS, "--store", str(tmp_path / "s.zarr"), "--quiet"]) == 0
    assert ais_oracle.encode_calls == 3  # every slice from the store
    labels = zarr.open_array(str(path / "labels" / "napari-sam" / "0"), mode="r")[0]
    assert all(best_iou(labels[0], t) >= 0.9 for t in truth)


# ---------------------------------------------------------------- installed command
@pytest.fixture
def vit_t(tmp_path_factory):
    return ["--model", "vit_t", "--checkpoint", random_vit_t_checkpoint(tmp_path_factory),
            "--device", "cpu", "--precision", "fp32"]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_the_installed_command_writes_ome_zarr_labels_and_refuses_to_overwrite(tmp_path, vit_t, version):
    stack, _ = objects_stack()
    path = tmp_path / "img.ome.zarr"
    write_ome_zarr(path, stack[None, :2] * 20, "czyx", version, scale=[1, 2.0, 0.5, 0.5])
    before = image_files(path)
    run = napari_sam("everything", path, *vit_t, *AMG)
    assert run.returncode == 0, run.stderr
    assert "objects in" in run.stderr and str(path / "labels" / "napari-sam") in run.stderr
    group = zarr.open_group(str(path / "labels" / "napari-sam"), mode="r")
    first = group["0"][...]
    assert first.shape == (1, 2, 200, 240) and first.max() > 0
    assert ome(dict(group.attrs))["image-label"]["source"]["image"] == "../../"
    assert image_files(path) == before
    stamp = {p: p.stat().st_mtime_ns for p in (path / "labels").rglob("*")}
    run = napari_sam("everything", path, *vit_t, *AMG)  # exists: refused before the model
    assert run.returncode == 2 and "--overwrite" in run.stderr and "Traceback" not in run.stderr
    assert {p: p.stat().st_mtime_ns for p in (path / "labels").rglob("*")} == stamp
    run = napari_sam("everything", path, *vit_t, *AMG, "--overwrite", "--points-per-side", "2")
    assert run.returncode == 0, run.stderr
    assert ome(attributes(path / "labels"))["labels"] == ["napari-sam"]  # listed once
    assert [p.name for p in (path / "labels").iterdir() if p.name.startswith(".napari-sam")] == []


def test_the_installed_command_writes_zarr_equal_to_tiff_and_npy(tmp_path):
    """The same labels in the three output formats. The oracle (deterministic, exact objects)
    rather than random weights: with every random mask kept, a logit a rounding away from 0
    could differ between runs on another CPU, and the formats are what is tested here."""
    np.save(tmp_path / "stack.npy", moving_stack(2, (200, 240)))
    env = oracle_env()
    outputs = {name: tmp_path / name for name in ("l.tif", "l.npy", "l.zarr")}
    for out in outputs.values():
        run = napari_sam("everything", tmp_path / "stack.npy", "-o", out, *AIS, "--quiet", env=env)
        assert run.returncode == 0, run.stderr
    tif, npy = tifffile.imread(outputs["l.tif"]), np.load(outputs["l.npy"])
    array = zarr.open_array(str(outputs["l.zarr"]), mode="r")
    assert array.dtype == np.uint32 and array.chunks == (1, 200, 240)  # one chunk per slice
    assert tif.shape == (2, 200, 240) and tif.max() >= 10 and tif.dtype == np.uint16
    assert np.array_equal(array[...], tif) and np.array_equal(npy, tif)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.npy", "l.tif", "l.zarr", "stack.npy"]
    # a zarr output is replaced only with --overwrite, and only if napari-sam wrote it
    run = napari_sam("everything", tmp_path / "stack.npy", "-o", outputs["l.zarr"], *AIS, env=env)
    assert run.returncode == 2 and "--overwrite" in run.stderr
    foreign = tmp_path / "foreign.zarr"
    zarr.create_array(str(foreign), shape=(2, 200, 240), dtype="uint8", zarr_format=2)[...] = 7
    run = napari_sam("everything", tmp_path / "stack.npy", "-o", foreign, *AIS, "--overwrite", env=env)
    assert run.returncode == 2 and "did not write" in run.stderr
    assert (zarr.open_array(str(foreign), mode="r")[...] == 7).all()


def test_tiling_flags_are_checked_before_the_model_and_reach_the_engine(tmp_path, ais_oracle, capsys):
    image, truth = draw_objects((600, 700), grid=(4, 5), seed=7, radius=(12, 30))
    np.save(tmp_path / "big.npy", image)
    bad = {("--tile-shape", "256", "--halo", "128"): "expected a halo smaller than half the tile",
           ("--tile-shape", "1", "2", "3"): "expected --tile-shape as one or two integers",
           ("--tiling", "off", "--tile-shape", "512"): "expected --tiling auto or on"}
    for extra, message in bad.items():
        assert main(["everything", str(tmp_path / "big.npy"), "-o", str(tmp_path / "o.tif"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert ais_oracle.build_calls == []
    out = tmp_path / "tiled.zarr"
    assert main(["everything", str(tmp_path / "big.npy"), "-o", str(out), *AIS,
                 "--tiling", "on", "--tile-shape", "256", "--halo", "32", "--quiet"]) == 0
    assert ais_oracle.encode_calls == len(TileGrid((600, 700), 256, 32)) == 12  # each tile once
    labels = zarr.open_array(str(out), mode="r")
    assert labels.shape == (600, 700) and labels.chunks == (256, 256)
    assert all(best_iou(labels[...], t) >= 0.9 for t in truth)
    assert len(np.unique(labels[...])) - 1 == len(truth)  # each object once across tiles


def test_a_large_2d_image_is_read_and_written_tile_by_tile(tmp_path, ais_oracle, monkeypatch):
    """A 2D OME-Zarr plane: its pixels are read one tile at a time (to encode it); its labels
    are stitched into the OME label array tile region by tile region."""
    image, truth = draw_objects((600, 700), grid=(4, 5), seed=7, radius=(12, 30))
    write_ome_zarr(tmp_path / "plane.zarr", image, "yx", "0.5", n_levels=2)
    from napari_sam._cli import ome_zarr

    monkeypatch.setattr(ome_zarr, "AxisView", Recording)
    Recording.reads = []
    assert main(["everything", str(tmp_path / "plane.zarr"), *AIS, "--tiling", "on",
                 "--tile-shape", "256", "--halo", "32", "--quiet"]) == 0
    assert Recording.reads and max(Recording.reads) <= 256 * 256  # never more than a tile
    labels = zarr.open_array(str(tmp_path / "plane.zarr" / "labels" / "napari-sam" / "0"), mode="r")
    assert labels.chunks == (256, 256)
    assert all(best_iou(labels[...], t) >= 0.9 for t in truth)
    assert len(np.unique(labels[...])) - 1 == len(truth)
    coarse = zarr.open_array(str(tmp_path / "plane.zarr" / "labels" / "napari-sam" / "1"), mode="r")
    assert coarse.shape == (300, 350)


# ---------------------------------------------------------------- lazy reading
class Recording(AxisView):
    """An AxisView recording the number of pixels of each read."""

    reads: ClassVar[list[int]] = []

    def __getitem__(self, key):
        out = super().__getitem__(key)
        Recording.reads.append(out.size)
        return out


def test_inputs_are_read_a_slice_at_a_time(tmp_path, ais_oracle, monkeypatch):
    stack, _ = objects_stack()
    path = tmp_path / "img.zarr"
    write_ome_zarr(path, np.concatenate([stack] * 3)[None], "czyx", "0.4")
    from napari_sam._cli import ome_zarr

    monkeypatch.setattr(ome_zarr, "AxisView", Recording)
    Recording.reads = []
    assert main(["everything", str(path), *AIS, "--quiet"]) == 0
    plane = 200 * 240
    assert Recording.reads and max(Recording.reads) <= plane  # never more than one slice
    assert sum(Recording.reads) <= (9 + 9) * plane  # contrast samples + one read per slice


def test_compressed_tiffs_stay_lazy_and_2d_zarr_inputs_work(tmp_path, ais_oracle):
    stack, truth = objects_stack()
    tifffile.imwrite(tmp_path / "zip.tif", stack, compression="zlib", tile=(64, 64))
    lazy = read_tiff(tmp_path / "zip.tif")
    assert not isinstance(lazy, np.ndarray) and lazy.chunks == (1, 64, 64)
    assert np.array_equal(np.asarray(lazy[1]), stack[1])
    zarr.create_array(str(tmp_path / "plane.zarr"), shape=(200, 240), chunks=(64, 64),
                      dtype="uint8", zarr_format=3)[...] = stack[0]
    assert read_stack(tmp_path / "plane.zarr").shape == (200, 240)
    assert main(["everything", str(tmp_path / "plane.zarr"), "-o", str(tmp_path / "p.tif"),
                 *AIS, "--quiet"]) == 0
    labels = tifffile.imread(tmp_path / "p.tif")
    assert labels.shape == (200, 240) and all(best_iou(labels, t) >= 0.9 for t in truth)


# ---------------------------------------------------------------- peak memory
def peak_rss_mb(*args, env=None) -> tuple[float, subprocess.CompletedProcess]:
    """Peak RSS (MiB) of the installed command run with ``args`` (see tests/rss.py)."""
    return rss.peak_rss_mb([NAPARI_SAM, *args], env=env, timeout=900)


def write_volume(path, n: int, side: int = 2048) -> np.ndarray:
    """(n, side, side) uint16 zarr volume of 36 objects drifting 4 pixels right per slice,
    one chunk per 512 x 512 block, written slice by slice. Returns slice 0's truth masks."""
    image, truth = draw_objects((side, side), grid=(6, 6), seed=5, radius=(60, 150))
    array = zarr.create_array(str(path), shape=(n, side, side), chunks=(1, 512, 512), dtype="uint16",
                              zarr_format=2)
    for z in range(n):
        array[z] = np.roll(image, 4 * z, axis=1).astype(np.uint16) * 20
    return truth


def test_a_lazy_volume_is_embedded_and_segmented_in_bounded_memory(tmp_path):
    """(12, 2048, 2048) uint16 (96 MiB; its uint32 labels 192 MiB), embedded and segmented by
    the installed command (the oracle as the model, so that memory is the data path's): the
    peak RSS of `embed` and of `everything --store` exceeds that of the same commands on a
    2-slice volume by less than 64 MiB, i.e. it does not grow with the stack (a few slices);
    holding the volume and its labels would add 240 MiB. Full size with vit_t:
    benchmarks/bench_lazy.py."""
    peaks, env = {}, oracle_env()
    for n in (2, 12):
        truth = write_volume(tmp_path / f"v{n}.zarr", n)
        store, out = tmp_path / f"s{n}.zarr", tmp_path / f"l{n}.zarr"
        rss_embed, run = peak_rss_mb("embed", tmp_path / f"v{n}.zarr", "--store", store, "--model",
                                     "vit_t_lm", "--quiet", env=env)
        assert run.returncode == 0, run.stderr
        rss_all, run = peak_rss_mb("everything", tmp_path / f"v{n}.zarr", "-o", out, "--store", store,
                                   *AIS, "--quiet", env=env)
        assert run.returncode == 0, run.stderr
        peaks[n] = (rss_embed, rss_all)
        labels = zarr.open_array(str(out), mode="r")
        assert labels.shape == (n, 2048, 2048)
        assert all(best_iou(labels[0], t) >= 0.9 for t in truth)
    print(f"peak RSS MiB (embed, everything): 2 slices {peaks[2]}, 12 slices {peaks[12]}")
    assert peaks[12][0] - peaks[2][0] < 64 and peaks[12][1] - peaks[2][1] < 64, peaks


# ---------------------------------------------------------------- Dask
ORACLE_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "oracle_site")


def oracle_env(**extra) -> dict:
    """Environment in which the installed command (and its Dask workers) builds the oracle
    with its AIS decoder (tests/oracle_site/sitecustomize.py) and uses one thread."""
    return {**os.environ, "PYTHONPATH": ORACLE_SITE, "NAPARI_SAM_ORACLE": "256",
            "OMP_NUM_THREADS": "1", **extra}


def moving_stack(n: int, shape=(300, 350)) -> np.ndarray:
    """(n, H, W) uint8 stack of 12 objects drifting 3 pixels right per slice."""
    image, _ = draw_objects(shape, grid=(3, 4), seed=9, radius=(12, 30))
    return np.stack([np.roll(image, 3 * z, axis=1) for z in range(n)])


def test_on_a_cluster_the_labels_equal_the_in_process_ones(tmp_path):
    """--workers 2: slices segmented (tiled here) by two worker processes, linked on the
    client: the same labels as in process; with --store the workers read the stored
    embeddings (the store's files are not rewritten)."""
    np.save(tmp_path / "in.npy", moving_stack(5))
    env, common = oracle_env(), [*AIS, "--tiling", "on", "--tile-shape", "256", "--halo", "32"]
    here = napari_sam("everything", tmp_path / "in.npy", "-o", tmp_path / "a.zarr", *common, env=env)
    there = napari_sam("everything", tmp_path / "in.npy", "-o", tmp_path / "b.zarr", *common,
                       "--workers", "2", "--quiet", env=env)
    assert here.returncode == 0 and there.returncode == 0, (here.stderr, there.stderr)
    assert "Traceback" not in there.stderr and "12 objects in" in there.stderr
    a, b = (zarr.open_array(str(tmp_path / n), mode="r")[...] for n in ("a.zarr", "b.zarr"))
    assert a.max() == 12 and np.array_equal(a, b)

    run = napari_sam("embed", tmp_path / "in.npy", "--store", tmp_path / "s.zarr", "--model",
                     "vit_t_lm", "--tiling", "on", "--tile-shape", "256", "--halo", "32", "--quiet", env=env)
    assert run.returncode == 0, run.stderr
    stamp = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()}
    stored = napari_sam("everything", tmp_path / "in.npy", "-o", tmp_path / "c.zarr", *AIS, "--store",
                        tmp_path / "s.zarr", "--workers", "2", "--quiet", env=env)
    assert stored.returncode == 0, stored.stderr
    assert np.array_equal(zarr.open_array(str(tmp_path / "c.zarr"), mode="r")[...], a)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "s.zarr").rglob("*")
            if p.is_file()} == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "b.zarr", "c.zarr", "in.npy", "s.zarr"]


def test_a_worker_killed_mid_run_loses_only_its_slice(tmp_path):
    import signal
    import time

    import psutil

    np.save(tmp_path / "in.npy", moving_stack(8, (200, 240)))
    env = oracle_env(NAPARI_SAM_ORACLE_DELAY="1.5")  # 1.5 s per slice: time to kill a worker in one
    proc = subprocess.Popen([str(NAPARI_SAM), "everything", str(tmp_path / "in.npy"), "-o",
                             str(tmp_path / "l.zarr"), *AIS, "--workers", "2", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while not list(tmp_path.glob(".l.zarr.*.slices.zarr/[0-9]*")):  # a first slice landed
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2
        os.kill(workers[0].pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err, err
    here = napari_sam("everything", tmp_path / "in.npy", "-o", tmp_path / "here.zarr", *AIS,
                      env=oracle_env())
    assert here.returncode == 0, here.stderr
    assert np.array_equal(zarr.open_array(str(tmp_path / "l.zarr"), mode="r")[...],
                          zarr.open_array(str(tmp_path / "here.zarr"), mode="r")[...])


def test_on_a_cluster_a_single_large_image_is_split_into_tile_tasks(tmp_path):
    """One 2D image, tiled: its 12 tiles are the tasks, stitched on the client: the same
    labels as the in-process tiled run (every object once)."""
    image, truth = draw_objects((600, 700), grid=(4, 5), seed=7, radius=(12, 30))
    np.save(tmp_path / "big.npy", image)
    common = [*AIS, "--tiling", "on", "--tile-shape", "256", "--halo", "32", "--quiet"]
    for name, extra in (("here.zarr", []), ("there.zarr", ["--workers", "2"])):
        run = napari_sam("everything", tmp_path / "big.npy", "-o", tmp_path / name, *common, *extra,
                         env=oracle_env())
        assert run.returncode == 0 and "20 objects in" in run.stderr, run.stderr
    here, there = (zarr.open_array(str(tmp_path / n), mode="r")[...] for n in ("here.zarr", "there.zarr"))
    assert np.array_equal(here, there) and all(best_iou(there, t) >= 0.9 for t in truth)


def test_an_unreachable_scheduler_is_one_line_and_writes_nothing(tmp_path, ais_oracle, capsys):
    np.save(tmp_path / "in.npy", moving_stack(2, (64, 80)))
    assert main(["everything", str(tmp_path / "in.npy"), "-o", str(tmp_path / "l.zarr"), *AIS,
                 "--scheduler", "tcp://127.0.0.1:9", "--quiet"]) == 1
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("napari-sam everything: error: cannot reach the Dask scheduler tcp://127.0.0.1:9")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy"]
    assert main(["everything", str(tmp_path / "in.npy"), "-o", str(tmp_path / "l.zarr"), "--workers", "0"]) == 2
    assert "expected --workers N with N >= 1" in capsys.readouterr().err
