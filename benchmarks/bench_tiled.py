"""Tiled embeddings and tiled segment-everything: encode throughput, tiling overhead, peak RSS.

    .venv/bin/python benchmarks/bench_tiled.py [--repeats 3] [--size 10000] [--write]

vit_t (MobileSAM) with random weights (timing and memory do not depend on them), fp32, CPU.

1. **Tiled encode** of a (1792, 1792) uint16 image: 2 x 2 tiles of 1024 (halo 128) through
   ``encode_tiles_job`` (one normalisation for all tiles from sampled tiles, each tile read
   from the image), against 4 plain ``SamPredictor.encode_image`` calls on the same four
   1024² crops (already in memory, same contrast limits). Tiled and plain alternate; each
   figure is the minimum of --repeats runs. Overhead = tiled / plain - 1 (target <= 15%).
2. **Peak RSS of tiled segment-everything** on a (size, size) uint16 image held as a zarr
   array on disk (chunks 1024², read one tile at a time), labels into a numpy (size, size)
   uint32 array (the default ``out``; 400 MB at 10000²), each mode in a fresh process
   (``common.run_worker``; peak = ru_maxrss of the process, model and all):
   * AMG: 1024 tiles, halo 128 (default tiling), ``points_per_side`` reduced to --amg-points
     (default 8: 64 prompts per tile instead of 1024) so that it completes in minutes, and
     its quality thresholds 0 (random weights would leave no mask; with 0, box NMS leaves
     one scattered mask of ~110k pixels spanning each tile, stitched as one object per tile);
   * AIS: micro-sam's decoder architecture (``InstanceDecoder(256, 1024)``, random weights,
     ~820 GFLOP per tile: 4-40 s per tile on a 2-core CPU), tiles of --ais-tile pixels
     (default 2048: 4x fewer decoder calls than 1024 tiles; each tile is resized to the
     model's 1024 input and its maps and watershed are at 2048², so the per-tile buffers are
     4x those of 1024 tiles: an upper bound for the default tiling's peak).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch

HERE = Path(__file__).resolve()
SECTION = "bench_tiled"


def vit_t(with_decoder: bool):
    """Random-weight vit_t (and micro-sam's AIS decoder architecture), eval, CPU."""
    from sam_factory import perturb_

    from napari_sam.model import build_model, get_config
    from napari_sam.model.instance_decoder import InstanceDecoder

    torch.manual_seed(0)
    model = build_model(get_config("vit_t")).eval()
    model.checkpoint_sha256 = "random"
    if with_decoder:
        model.instance_decoder = perturb_(InstanceDecoder(256, 1024, transposed=True), seed=3).eval()
    return model


def blobs(shape, seed: int = 0) -> np.ndarray:
    """(H, W) uint16: noise plus bright disks every ~64 pixels (cells), made row band by row
    band (no full-size float temporaries)."""
    rng = np.random.default_rng(seed)
    out = np.empty(shape, np.uint16)
    yy, xx = np.mgrid[0:256, 0:shape[1]]
    for r0 in range(0, shape[0], 256):
        band = rng.normal(1000, 50, (256, shape[1])).astype(np.float32)
        for _ in range(shape[1] // 64 * 4):
            cy, cx, rad = rng.uniform(0, 256), rng.uniform(0, shape[1]), rng.uniform(8, 24)
            x0, x1 = int(max(cx - rad, 0)), int(min(cx + rad + 1, shape[1]))
            disk = (yy[:, x0:x1] - cy) ** 2 + (xx[:, x0:x1] - cx) ** 2 <= rad**2
            band[:, x0:x1][disk] += rng.uniform(2000, 8000)
        out[r0:r0 + 256] = band[: shape[0] - r0].clip(0, 65535).astype(np.uint16)
    return out


# ---------------------------------------------------------------------------- 1. encode
def encode_overhead(repeats: int) -> dict:
    from napari_sam.engine.automatic import run_to_end
    from napari_sam.engine.predictor import SamPredictor
    from napari_sam.engine.tiled_predictor import encode_tiles_job
    from napari_sam.engine.tiling import TileGrid, read_tile, tiled_contrast_limits

    predictor = SamPredictor(vit_t(False))
    image = blobs((1792, 1792))
    grid = TileGrid(image.shape, 1024, 128)
    assert len(grid) == 4
    limits = tiled_contrast_limits(image, grid)
    crops = [np.ascontiguousarray(read_tile(image, t)) for t in grid.tiles]
    predictor.encode_image(crops[0], contrast_limits=limits)  # warm-up
    tiled, plain = [], []
    for _ in range(repeats):  # alternating
        t0 = time.perf_counter()
        run_to_end(encode_tiles_job(predictor, image, grid, "auto"))
        tiled.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for crop in crops:
            predictor.encode_image(crop, contrast_limits=limits)
        plain.append(time.perf_counter() - t0)
    return {"tiles": len(grid), "tiled_s": min(tiled), "plain_s": min(plain),
            "tiles_per_s": len(grid) / min(tiled), "overhead": min(tiled) / min(plain) - 1,
            "all_tiled": tiled, "all_plain": plain}


# ---------------------------------------------------------------------------- 2. peak RSS
def make_zarr(path: str, size: int) -> None:
    import zarr

    array = zarr.create_array(path, shape=(size, size), chunks=(1024, 1024), dtype="uint16")
    for r0 in range(0, size, 1024):
        array[r0:r0 + 1024] = blobs((min(1024, size - r0), size), seed=r0)


def worker(mode: str, path: str, tile: int, amg_points: int) -> dict:
    import zarr

    from napari_sam.engine.automatic import run_to_end
    from napari_sam.engine.instances import SamInstanceSegmenter
    from napari_sam.engine.tiling import tile_grid

    image = zarr.open_array(path, mode="r")
    model = vit_t(mode == "ais")
    keep_all = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}  # random weights: else no mask
    segmenter = SamInstanceSegmenter(model, mode, amg={"points_per_side": amg_points, **keep_all})
    before = common.peak_rss_mb()
    grid = tile_grid(image.shape, model.image_size, "on", tile, tile // 8)
    t0 = time.perf_counter()
    result = run_to_end(segmenter.job(image, grid=grid))
    seconds = time.perf_counter() - t0
    return {"mode": mode, "size": list(image.shape), "tile": tile, "tiles": len(grid), "seconds": seconds,
            "objects": result.n_objects, "model_peak_mb": before, "peak_mb": common.peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=10000, help="side of the RSS image")
    parser.add_argument("--amg-points", type=int, default=8)
    parser.add_argument("--ais-tile", type=int, default=2048)
    parser.add_argument("--modes", nargs="+", default=["encode", "amg", "ais"])
    parser.add_argument("--load", default="", help="what else ran on the machine (for the table)")
    parser.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    parser.add_argument("--worker", nargs=4, metavar=("MODE", "ZARR", "TILE", "AMG_POINTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, path, tile, points = args.worker
        print(json.dumps(worker(mode, path, int(tile), int(points))))
        return

    cpu = common.cpu_name()
    rows = []
    if "encode" in args.modes:
        e = encode_overhead(args.repeats)
        print(json.dumps(e), flush=True)
        target = "✔" if e["overhead"] <= 0.15 else "✘"
        rows.append(f"| tiled encode, 4 tiles of 1024² (1792² uint16) | {e['tiled_s']:.2f} s "
                    f"({e['tiles_per_s']:.2f} tiles/s) | 4 plain encodes: {e['plain_s']:.2f} s | "
                    f"overhead **{100 * e['overhead']:+.1f}%** | ≤ 15% {target} |")
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "image.zarr")
        if {"amg", "ais"} & set(args.modes):
            make_zarr(path, args.size)
        for mode in ("amg", "ais"):
            if mode not in args.modes:
                continue
            tile = 1024 if mode == "amg" else args.ais_tile
            r = common.run_worker(HERE, mode, path, str(tile), str(args.amg_points))
            print(json.dumps(r), flush=True)
            what = (f"AMG {args.amg_points}x{args.amg_points} points/tile" if mode == "amg"
                    else "AIS (micro-sam decoder architecture)")
            target = "✔" if r["peak_mb"] <= 3 * 1024 else "✘"
            rows.append(f"| {what}, {args.size}² uint16 zarr, {r['tiles']} tiles of {tile}² | "
                        f"{r['seconds']:.0f} s, {r['objects']} objects | model loaded: "
                        f"{r['model_peak_mb']:.0f} MiB | peak RSS **{r['peak_mb']:.0f} MiB** | ≤ 3 GB {target} |")
    lines = [
        "## Tiled embeddings and tiled segment-everything (`benchmarks/bench_tiled.py`)",
        "",
        f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}; vit_t random weights, "
        f"fp32. {args.load}".rstrip(),
        "",
        "| what | tiled | reference point | result | target |",
        "|---|---|---|---|---|",
        *rows,
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        common.write_section(SECTION, table)
        print("BENCHMARKS.md updated", file=sys.stderr)


if __name__ == "__main__":
    main()
