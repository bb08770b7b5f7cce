"""Lazy volumes from the command line: peak memory of ``napari-sam embed`` and
``napari-sam everything --store`` on a (200, 2048, 2048) uint16 zarr volume.

    python benchmarks/bench_lazy.py [--slices 2 20 200] [--side 2048]
        [--tiling off|auto|on] [--workdir DIR] [--write]   # --write: BENCHMARKS.md section

The installed command runs as a user runs it, with random vit_t weights (the real
architecture; the same cost per slice as MobileSAM), fp32 on the CPU, and everything in
AMG mode with reduced settings (2 x 2 points, no quality thresholds: random weights give
masks that would otherwise be filtered away) so that 200 slices finish in minutes. The
peak RSS of each command is the kernel's ``ru_maxrss`` of that process (``os.wait4``).

The bound: a command on N slices peaks less than 64 MiB above the same command on a
shorter volume of at least 16 slices (the data hash and the contrast limits sample up to
16 slices), i.e. model + a few slices, whatever N. Loading the volume whole would add
N x 8 MiB (uint16 pixels) and its labels N x 16 MiB (uint32).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cpu_name, write_section

NAPARI_SAM = Path(sys.executable).with_name("napari-sam")
BOUND_MIB = 64
SAMPLED = 16  # slices sampled for the data hash and the contrast limits (engine/stack.py)
AMG = ["--mode", "amg", "--points-per-side", "2", "--pred-iou-thresh", "0",
       "--stability-score-thresh", "0", "--quiet"]


def write_volume(path: Path, n: int, side: int) -> None:
    """(n, side, side) uint16 zarr (format 2), chunks (1, 512, 512), written slice by slice."""
    import zarr

    array = zarr.create_array(str(path), shape=(n, side, side), chunks=(1, 512, 512),
                              dtype="uint16", zarr_format=2)
    yy, xx = np.mgrid[0:side, 0:side]
    for z in range(n):
        blobs = np.sin(yy / 40.0 + z / 7) * np.cos(xx / 55.0 - z / 11) > 0.3
        array[z] = (blobs * 3000 + yy % 97).astype(np.uint16)


def random_vit_t(path: Path) -> Path:
    import torch

    from napari_sam.model import build_model, get_config

    torch.manual_seed(0)
    torch.save(build_model(get_config("vit_t")).state_dict(), path)
    return path


def measured(*args) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of ``napari-sam *args`` (fails loudly on a non-zero exit)."""
    from rss import peak_rss_mb  # tests/rss.py: measured from a small launcher process

    t0 = time.perf_counter()
    peak, run = peak_rss_mb([NAPARI_SAM, *args])
    if run.returncode != 0:
        raise RuntimeError(f"napari-sam {' '.join(map(str, args))} failed:\n{run.stderr[-3000:]}")
    return time.perf_counter() - t0, peak


def run(n: int, side: int, work: Path, checkpoint: Path, tiling: str) -> dict:
    volume, store, labels = work / f"v{n}.zarr", work / f"s{n}.zarr", work / f"l{n}.zarr"
    write_volume(volume, n, side)
    model = ["--model", "vit_t", "--checkpoint", checkpoint, "--device", "cpu", "--precision", "fp32"]
    embed = measured("embed", volume, "--store", store, *model, "--tiling", tiling, "--quiet")
    everything = measured("everything", volume, "-o", labels, "--store", store, *model, *AMG)
    return {"n": n, "embed": embed, "everything": everything}


def section(results: list[dict], side: int, tiling: str, load: float) -> str:
    """The BENCHMARKS.md section of ``results`` (one dict per volume length, ascending)."""
    lines = [f"| {r['n']} x {side}² | {r['embed'][0]:.0f} s | {r['embed'][1]:.0f} MiB | "
             f"{r['everything'][0]:.0f} s | {r['everything'][1]:.0f} MiB |" for r in results]
    big = results[-1]
    ref = [r for r in results[:-1] if r["n"] >= SAMPLED] or results[:1]
    ref = ref[-1]
    growth = (big["embed"][1] - ref["embed"][1], big["everything"][1] - ref["everything"][1])
    whole = big["n"] * side**2 * (2 + 4) / 2**20
    squeezed = " (each 2048² slice squeezed into one 1024 input)" if tiling == "off" else ""
    return f"""## Lazy volumes from the command line (bench_lazy)

`python benchmarks/bench_lazy.py --slices {' '.join(str(r['n']) for r in results)} --side {side} --write`
on {cpu_name()} ({os.cpu_count()} cores, shared with other jobs: load average up to {load:.1f}).
A uint16 zarr volume (chunks 1 x 512 x 512) is embedded (`napari-sam embed VOLUME --store S.zarr`)
and segmented (`napari-sam everything VOLUME -o L.zarr --store S.zarr`) by the installed command,
random vit_t weights, fp32 CPU, `--tiling {tiling}`{squeezed}. Reduced so that it finishes: AMG
with 2 x 2 points and no quality thresholds (AIS's decoder costs tens of seconds per 1024 input
on this CPU). Peak RSS: the kernel's ru_maxrss of each command (started from a small launcher,
tests/rss.py). Times include start-up and the load of the shared machine.

| volume | embed | embed peak RSS | everything | everything peak RSS |
|---|---|---|---|---|
{chr(10).join(lines)}

Up to {SAMPLED} slices, more slices are sampled for the data hash and the contrast limits
(a fixed cost, then constant). Bound: {big['n']} slices peak within {BOUND_MIB} MiB of
{ref['n']} slices (model + a few slices, whatever the stack length): {'met' if max(growth) < BOUND_MIB else 'NOT met'}
({growth[0]:+.0f} MiB embed, {growth[1]:+.0f} MiB everything). Holding the {big['n']}-slice volume and its
uint32 labels in RAM would take {whole:,.0f} MiB more.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[2, 20, 200],
                        help="volume lengths, measured in this order (the last is compared)")
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--tiling", default="off", choices=("auto", "on", "off"),
                        help="embed's tiling (everything follows the store); off: one encode per slice")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        checkpoint = random_vit_t(work / "vit_t.pt")
        load, results = os.getloadavg()[0], []
        for n in sorted(args.slices):
            results.append(run(n, args.side, work, checkpoint, args.tiling))
            load = max(load, os.getloadavg()[0])
            print(results[-1], flush=True)
    body = section(results, args.side, args.tiling, load)
    print(body)
    if args.write:
        write_section("bench_lazy", body)


if __name__ == "__main__":
    main()
