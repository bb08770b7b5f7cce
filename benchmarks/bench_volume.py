"""Volume benchmarks: embedding store throughput / reopen / RAM, propagation speed, and
the comparison of propagation prompt strategies.

    python benchmarks/bench_volume.py store [--model vit_t] [--checkpoint PATH]
        [--slices 100] [--size 512]           # figures for BENCHMARKS.md
    python benchmarks/bench_volume.py compare # strategies on synthetic oracle scenarios
    python benchmarks/bench_volume.py compare --image STACK.tif --labels GT.tif \
        --model vit_b --checkpoint sam_vit_b.pth   # strategies with real weights and data

``store`` uses random weights unless ``--checkpoint`` is given (same cost per slice). The
stack is generated slice by slice on demand, so the RAM figures are the store's and the
model's, not the data's. Peak RSS is sampled as slices are stored: a bounded store shows
the same peak after 10 slices as after all of them.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the oracle model lives with the tests

from napari_sam.engine.store import EmbeddingStore  # noqa: E402
from napari_sam.engine.volume import (  # noqa: E402
    DEFAULT_STRATEGY, STRATEGIES, PromptStrategy, _predict, _Slice, SliceStats, iou, propagate, run_generator)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SyntheticStack:
    """(N, S, S) uint16 stack generated on demand: a bright ellipsoid plus noise."""

    def __init__(self, n: int, size: int) -> None:
        self.shape, self.dtype, self.ndim = (n, size, size), np.dtype(np.uint16), 3
        yy, xx = np.mgrid[:size, :size]
        self._r2 = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (size / 4) ** 2

    def __getitem__(self, key):
        z = key[0] if isinstance(key, tuple) else key
        n = self.shape[0]
        rng = np.random.default_rng(int(z))
        radius2 = max(0.0, 1 - ((z - n / 2) / (n / 2)) ** 2)
        img = 1000 + 3000 * (self._r2 <= radius2) + rng.normal(0, 100, self._r2.shape)
        return img.astype(np.uint16)


def load_model(args):
    from napari_sam.engine import build_sam
    from napari_sam.engine.device import choose_device, choose_precision
    from napari_sam.model import build_model, get_config

    if args.checkpoint:
        return build_sam(args.model, args.checkpoint, device=args.device, precision=args.precision)
    device = choose_device(args.device)
    model = build_model(get_config(args.model)).to(device).eval()
    model.checkpoint_sha256 = "random-weights"
    model.encoder_dtype = model.decoder_dtype = choose_precision(args.precision, device)
    return model


def count_encoder_calls(model) -> list[int]:
    calls, encode = [0], model.encode

    def counted(x):
        calls[0] += 1
        return encode(x)

    model.encode = counted
    return calls


def bench_store(args) -> None:
    model = load_model(args)
    calls = count_encoder_calls(model)
    stack = SyntheticStack(args.slices, args.size)
    print(f"model {args.model} ({'checkpoint' if args.checkpoint else 'random weights'}), "
          f"device {model.device}, stack {stack.shape} uint16, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stack.zarr"
        store = EmbeddingStore.open(path, stack, model)
        store.encode(0)  # warm-up (allocations, lazy init) outside the timings
        rss0, rss = peak_rss_mb(), {}
        start = time.perf_counter()
        for p in store.precompute(center=args.slices // 2):
            if p.n_computed in (10, args.slices // 2, args.slices):
                rss[p.n_computed] = peak_rss_mb()
        seconds = time.perf_counter() - start
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
        print(f"precompute: {args.slices} slices in {seconds:.1f} s = "
              f"{args.slices / seconds:.2f} slices/s; store {disk:.0f} MiB on disk")
        print(f"peak RSS: {rss0:.0f} MB before, " + ", ".join(f"{v:.0f} MB after {k} slices" for k, v in rss.items()))

        calls[0] = 0
        start = time.perf_counter()
        store = EmbeddingStore.open(path, stack, model)
        first = store.embedding(args.slices // 2)
        reopen = time.perf_counter() - start
        run_generator(store.precompute())
        print(f"reopen: {reopen:.2f} s to open and read one slice ({store.status.state}); "
              f"encoder calls after reopen + precompute: {calls[0]}")

        predictor_cls = __import__("napari_sam.engine", fromlist=["SamPredictor"]).SamPredictor
        predictor = predictor_cls(model)
        predictor.set_embedding(first)
        yy, xx = np.mgrid[: args.size, : args.size]
        disc = (yy - args.size / 2) ** 2 + (xx - args.size / 2) ** 2 <= (args.size / 5) ** 2
        prev = _Slice(args.slices // 2, disc, None, SliceStats(0, int(disc.sum()), 1, 1, "start"))
        steps = min(20, args.slices)
        for name in ("box+points", "box", "points", "box+points+mask"):
            strategy = PromptStrategy.parse(name)
            for j in range(3):  # warm-up: first decodes create kernels/allocations
                _predict(predictor, prev, strategy)
            reads, decodes = [], []
            for j in range(steps):  # the exact per-slice work of propagate(): read + decode
                t0 = time.perf_counter()
                emb = store.embedding(j)
                t1 = time.perf_counter()
                predictor.set_embedding(emb)
                _predict(predictor, prev, strategy)
                reads.append(t1 - t0)
                decodes.append(time.perf_counter() - t1)
            total = np.median(np.add(reads, decodes)) * 1000
            print(f"propagation step ({name}): median {total:.0f} ms per slice = store read "
                  f"{np.median(reads) * 1000:.0f} ms + prompts/decode/upsample "
                  f"{np.median(decodes) * 1000:.0f} ms")
        result = run_generator(propagate(model, store, args.slices // 2, disc, iou_threshold=0.0))
        print(f"propagate() ran over {result.masks.shape[0]} slices; stops: {result.stops}")


# ------------------------------------------------------------------ strategy comparison
def scenarios(n: int = 24, size: int = 128) -> dict:
    """name -> (uint8 volume (n, size, size), truth bool volume, start slice)."""
    z, y, x = np.mgrid[:n, :size, :size].astype(np.float32)
    c = size / 2
    out = {}

    def scene(name, truth, extra=(), start=n // 2):
        vol = np.zeros(truth.shape, np.uint8)
        for mask, value in extra:
            vol[mask] = value
        vol[truth] = 200
        out[name] = (vol, truth, start)

    ell = ((z - n / 2) / (n / 2.6)) ** 2 + ((y - c) / 30) ** 2 + ((x - c + 10) / 22) ** 2 <= 1
    scene("ellipsoid+distractors", ell, [((y - 20) ** 2 + (x - 105) ** 2 <= 100, 90),
                                         ((z - 5) ** 2 + (y - 105) ** 2 + (x - 30) ** 2 <= 80, 140)])
    flat = ((z - n / 2) / 5) ** 2 + ((y - c) / 40) ** 2 + ((x - c) / 40) ** 2 <= 1
    scene("fast shape change", flat)
    drift = (y - c) ** 2 + (x - 16 - 4 * z) ** 2 <= 12**2
    scene("drift (time series)", drift & (x < size), [((y - c - 30) ** 2 + (x - c) ** 2 <= 64, 120)])
    touch_r = 20 + 6 * np.sin(z / 4)
    blob = (y - c) ** 2 + (x - c) ** 2 <= touch_r**2
    scene("touching neighbour", blob, [((y - c) ** 2 + (x - c - touch_r - 14) ** 2 <= 14**2, 120)])
    tube_c = c + 20 * np.sin(z / 6)
    scene("curved tube", (y - c) ** 2 + (x - tube_c) ** 2 <= (11 + 4 * np.cos(z / 5)) ** 2)
    low = ((z - 8) / 5) ** 2 + ((y - c) / 25) ** 2 + ((x - c) / 25) ** 2 <= 1
    high = ((z - 18) / 4) ** 2 + ((y - c) / 25) ** 2 + ((x - c) / 25) ** 2 <= 1
    scene("object ends mid-stack", low, [(high, 130)], start=8)
    return out


def samlike_oracle(image_size: int, seed: int):
    """The oracle made more SAM-like, for the comparison (a caricature, not SAM):

    * prompts combine jointly instead of as a union: a box selects the largest region of
      one intensity inside it (SAM stops at intensity edges, the plain oracle merges
      touching objects); box + points give the regions under the points, cut at the box;
    * each mask's border is off by one low-res pixel (~2 image px) at random;
    * a lone positive point returns only part of the object half of the time (SAM's
      part/whole ambiguity).
    """
    from oracle import TOLERANCE, OracleSam
    from scipy import ndimage

    class SamLikeOracle(OracleSam):
        rng = np.random.default_rng(seed)

        @staticmethod
        def _largest_in_box(img, box):
            x0, y0, x1, y1 = (int(round(float(v))) for v in box)
            inside = np.zeros(img.shape, dtype=bool)
            inside[max(y0, 0) : max(y1, 0) + 1, max(x0, 0) : max(x1, 0) + 1] = True
            best = np.zeros(img.shape, dtype=bool)
            for value in np.unique(np.round(img[inside & (img > TOLERANCE)])):
                labels, n = ndimage.label((np.abs(img - value) <= TOLERANCE) & inside)
                if n:
                    sizes = np.bincount(labels.ravel())[1:]
                    if sizes.max() > best.sum():
                        best = labels == 1 + int(np.argmax(sizes))
            return best

        def decode(self, features, points_xy=None, point_labels=None, boxes_xyxy=None,
                   mask_input=None, multimask_output=True, cache=None):
            joint = boxes_xyxy is not None and points_xy is not None
            if joint:  # the regions under the points, cut at the box
                low, score = super().decode(features, points_xy, point_labels, None, None,
                                            multimask_output, cache)
                x0, y0, x1, y1 = (max(0, int(round(v / 4))) for v in boxes_xyxy[0].tolist())
                outside = torch.ones_like(low, dtype=torch.bool)
                outside[..., y0 : y1 + 1, x0 : x1 + 1] = False
                low = low.masked_fill(outside, -10.0)
            else:
                low, score = super().decode(features, points_xy, point_labels, boxes_xyxy,
                                            mask_input, multimask_output, cache)
            for b in range(low.shape[0]):
                for k in range(low.shape[1]):
                    m = low[b, k].numpy() > 0
                    shift = self.rng.choice([-1, 0, 0, 1])
                    m = (ndimage.binary_dilation(m) if shift > 0 else
                         ndimage.binary_erosion(m) if shift < 0 else m)
                    lone = points_xy is not None and points_xy.shape[1] == 1 and boxes_xyxy is None
                    if lone and self.rng.random() < 0.5:  # part of the object only
                        m[:, int(points_xy[b, 0, 0].item() / 4) + 3 :] = False
                    low[b, k] = torch.from_numpy(np.where(m, 10.0, -10.0).astype(np.float32))
            return low, score

    return SamLikeOracle(image_size)


def compare_synthetic(args) -> None:
    from oracle import OracleSam

    from napari_sam.engine.stack import VolumeEmbeddings

    seeds = range(args.seeds)
    models = {"oracle": [lambda: OracleSam(256)],
              "SAM-like": [lambda s=s: samlike_oracle(256, s) for s in seeds]}
    variants = {s: (s, 0.5) for s in STRATEGIES}
    variants["points, 1 point"] = (PromptStrategy(box=False, points=True, n_points=1), 0.5)
    variants["box+points, margin 0.1"] = (PromptStrategy(box_margin=0.1), 0.5)
    variants["box+points, no motion"] = (PromptStrategy(follow_motion=False), 0.5)
    variants["points, no motion"] = (PromptStrategy(box=False, follow_motion=False), 0.5)
    for thr in (0.3, 0.7):
        variants[f"box+points, iou_threshold {thr}"] = (DEFAULT_STRATEGY, thr)
    rows = {s: {} for s in variants}
    for name, (vol, truth, start) in scenarios().items():
        for label, makers in models.items():
            for strat, (spec, thr) in variants.items():
                scores = []
                for make in makers:
                    model = make()
                    emb = VolumeEmbeddings(vol, model, cache_size=len(vol))
                    res = run_generator(propagate(model, emb, start, truth[start], strategy=spec,
                                                  iou_threshold=thr))
                    scores.append(iou(res.to_volume(len(vol)), truth))
                rows[strat][(name, label)] = np.mean(scores)
    keys = list(next(iter(rows.values())))
    print(f"3D IoU with the truth (SAM-like: mean of {args.seeds} seeds)\n")
    print("| strategy | " + " | ".join(f"{n} ({m})" for n, m in keys) + " | mean oracle | mean SAM-like |")
    print("|---" * (len(keys) + 3) + "|")
    for strat, vals in rows.items():
        v = [vals[k] for k in keys]
        print(f"| {strat} | " + " | ".join(f"{x:.2f}" for x in v) +
              f" | {np.mean(v[0::2]):.3f} | {np.mean(v[1::2]):.3f} |")


def compare_real(args) -> None:
    import tifffile

    image, labels = tifffile.imread(args.image), tifffile.imread(args.labels)
    if image.shape[:3] != labels.shape:
        raise SystemExit(f"expected labels of shape {image.shape[:3]}, got {labels.shape}")
    model = load_model(args)
    ids = [i for i in np.unique(labels) if i != 0][: args.max_objects]
    with tempfile.TemporaryDirectory() as tmp:
        store = EmbeddingStore.open(Path(tmp) / "s.zarr", image, model)
        run_generator(store.precompute(center=len(image) // 2))
        print("| strategy | mean 3D IoU | per object |\n|---|---|---|")
        for strat in STRATEGIES:
            scores = []
            for i in ids:
                obj = labels == i
                start = int(np.argmax(obj.reshape(len(obj), -1).sum(1)))
                res = run_generator(propagate(model, store, start, obj[start], strategy=strat))
                scores.append(iou(res.to_volume(len(obj)), obj))
            print(f"| {strat} | {np.mean(scores):.3f} | " + " ".join(f"{s:.2f}" for s in scores) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["store", "compare"])
    parser.add_argument("--model", default="vit_t")
    parser.add_argument("--checkpoint")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--image", help="compare: (Z, H, W) stack tif with real data")
    parser.add_argument("--labels", help="compare: (Z, H, W) ground-truth label tif")
    parser.add_argument("--max-objects", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3, help="compare: SAM-like oracle seeds")
    args = parser.parse_args()
    if args.what == "store":
        bench_store(args)
    elif args.image:
        compare_real(args)
    else:
        compare_synthetic(args)


if __name__ == "__main__":
    main()
