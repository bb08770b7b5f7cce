"""Client code written for segment_anything runs on napari_sam with its import lines changed.

Each client below is our own rewrite of the calls that a public client makes (Meta's
predictor and automatic-mask-generator notebooks, the body of Meta's ``scripts/amg.py``,
MobileSAM's README). It is run twice, with ``PACKAGE`` in its import lines replaced by the
reference package and by ``napari_sam``, on identical random weights; the outputs must
match: masks IoU >= 0.99, scores within 1e-4.

Models are small versions of the real architecture, registered in both registries under
one name, so that ``sam_model_registry[model_type](checkpoint=...)`` is called as the
clients call it.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reference_shim import import_mobile_sam, import_segment_anything
from test_dropin_api import iou, scene

MODEL_TYPE = "vit_tiny_test"


def run_client(source: str, package: str, **inputs) -> dict:
    """Execute ``source`` with ``PACKAGE`` -> ``package`` (its import lines only)."""
    assert all("PACKAGE" not in line or line.startswith("from PACKAGE") for line in source.splitlines())
    namespace = {"np": np, "torch": torch, **inputs}
    code = compile(source.replace("PACKAGE", package), f"<client on {package}>", "exec")
    exec(code, namespace)  # noqa: S102 - our own test code
    return namespace


@pytest.fixture
def register(monkeypatch, tmp_path):
    """register(config, decisive=False, seed=3) -> checkpoint path: a random reference model of
    ``config`` saved as a checkpoint, and MODEL_TYPE in both registries building it."""

    def _register(config, decisive=False, seed=3):
        from sam_factory import decisive_, reference_sam, save_checkpoint

        import napari_sam
        from napari_sam import compat

        sa = import_segment_anything()
        torch.manual_seed(0)
        model = reference_sam(config, seed=seed)
        if decisive:
            decisive_(model)
        path = save_checkpoint(model, tmp_path / "tiny.pth")

        def build_reference(checkpoint=None):  # what the reference builders do
            torch.manual_seed(1)
            sam = reference_sam(config, seed=5).eval()
            if checkpoint is not None:
                sam.load_state_dict(torch.load(checkpoint))
            return sam

        monkeypatch.setitem(sa.sam_model_registry, MODEL_TYPE, build_reference)
        monkeypatch.setitem(napari_sam.sam_model_registry, MODEL_TYPE, compat._builder(config))
        return str(path)

    return _register


@pytest.fixture
def one_thread():
    """Decoding a point grid with a tiny model is thousands of small ops: on a busy 2-core
    machine two threads wait on each other (measured 3-10x slower); one is steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_records(ours: list[dict], ref: list[dict]) -> None:
    """Automatic-mask records: same count and keys; each reference record matched by one
    of ours (mask IoU >= 0.99, scores within 1e-4, same point, box and crop box)."""
    assert len(ours) == len(ref)
    unused = list(range(len(ours)))
    for r in ref:
        best = max(unused, key=lambda j: iou(ours[j]["segmentation"], r["segmentation"]))
        o = ours[best]
        unused.remove(best)
        assert set(o) == set(r)
        assert iou(o["segmentation"], r["segmentation"]) >= 0.99
        assert o["predicted_iou"] == pytest.approx(r["predicted_iou"], abs=1e-4)
        assert o["stability_score"] == pytest.approx(r["stability_score"], abs=1e-4)
        assert o["point_coords"][0] == pytest.approx(r["point_coords"][0])
        assert o["bbox"] == pytest.approx(r["bbox"], abs=1)
        assert o["crop_box"] == pytest.approx(r["crop_box"])
        assert o["area"] == pytest.approx(r["area"], rel=0.01, abs=2)


# ---------------------------------------------------------------------- predictor notebook

PREDICTOR_NOTEBOOK = """
from PACKAGE import sam_model_registry, SamPredictor

sam = sam_model_registry[model_type](checkpoint=sam_checkpoint)
sam.to(device=device)
predictor = SamPredictor(sam)
predictor.set_image(image)
results = {}

# one click, three candidate masks
masks, scores, logits = predictor.predict(
    point_coords=np.array([[500, 375]]), point_labels=np.array([1]), multimask_output=True
)
results["click"] = (masks, scores)

# a second click, with the best candidate's low-res logits as mask input
best_logits = logits[np.argmax(scores), :, :]
for name, labels in (("two clicks", [1, 1]), ("click and background click", [1, 0])):
    masks, scores, _ = predictor.predict(
        point_coords=np.array([[500, 375], [1125, 625]]),
        point_labels=np.array(labels),
        mask_input=best_logits[None, :, :],
        multimask_output=False,
    )
    results[name] = (masks, scores)

# a box, then the box with a background click
window = np.array([425, 600, 700, 875])
masks, scores, _ = predictor.predict(
    point_coords=None, point_labels=None, box=window[None, :], multimask_output=False
)
results["box"] = (masks, scores)
masks, scores, _ = predictor.predict(
    point_coords=np.array([[575, 750]]), point_labels=np.array([0]), box=window,
    multimask_output=False,
)
results["box and background click"] = (masks, scores)

# several boxes at once, on the torch side
boxes = torch.tensor(
    [[75, 275, 1725, 850], [425, 600, 700, 875], [1375, 550, 1650, 800], [1240, 675, 1400, 750]],
    device=predictor.device,
)
masks, scores, _ = predictor.predict_torch(
    point_coords=None,
    point_labels=None,
    boxes=predictor.transform.apply_boxes_torch(boxes, image.shape[:2]),
    multimask_output=False,
)
results["four boxes"] = (masks.cpu().numpy(), scores.cpu().numpy())

# two images with their boxes in one call of the model
from PACKAGE.utils.transforms import ResizeLongestSide

resize = ResizeLongestSide(sam.image_encoder.img_size)


def as_model_input(img, transform, device):
    resized = torch.as_tensor(transform.apply_image(img), device=device.device)
    return resized.permute(2, 0, 1).contiguous()


boxes2 = torch.tensor(
    [[450, 170, 520, 350], [350, 190, 450, 350], [500, 170, 580, 350], [580, 170, 640, 350]],
    device=sam.device,
)
batched_input = [
    {"image": as_model_input(image, resize, sam),
     "boxes": resize.apply_boxes_torch(boxes, image.shape[:2]),
     "original_size": image.shape[:2]},
    {"image": as_model_input(image2, resize, sam),
     "boxes": resize.apply_boxes_torch(boxes2, image2.shape[:2]),
     "original_size": image2.shape[:2]},
]
batched_output = sam(batched_input, multimask_output=False)
for k, output in enumerate(batched_output):
    results[f"model call, image {k}"] = (output["masks"].cpu().numpy(), output["iou_predictions"].cpu().numpy())
"""


def assert_same_results(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref)
    for name in ref:
        (m_ours, s_ours), (m_ref, s_ref) = ours[name], ref[name]
        assert m_ours.shape == m_ref.shape and m_ours.dtype == m_ref.dtype == bool, name
        flat_ours, flat_ref = m_ours.reshape(-1, *m_ours.shape[-2:]), m_ref.reshape(-1, *m_ref.shape[-2:])
        for a, b in zip(flat_ours, flat_ref):
            assert iou(a, b) >= 0.99, name
        np.testing.assert_allclose(s_ours, s_ref, atol=1e-4, err_msg=name)


def test_predictor_notebook(register):
    from sam_factory import TINY_VIT_B_1024

    checkpoint = register(TINY_VIT_B_1024)
    inputs = dict(
        image=scene(1200, 1800, 0),  # the notebook's photographs' sizes, synthetic content
        image2=scene(500, 700, 1),
        sam_checkpoint=checkpoint,
        model_type=MODEL_TYPE,
        device="cpu",
    )
    ref = run_client(PREDICTOR_NOTEBOOK, "segment_anything", **inputs)
    ours = run_client(PREDICTOR_NOTEBOOK, "napari_sam", **inputs)
    assert type(ours["predictor"]).__module__.startswith("napari_sam")
    assert ours["results"]["click"][0].shape == (3, 1200, 1800)
    assert ours["results"]["four boxes"][0].shape == (4, 1, 1200, 1800)
    assert ours["results"]["model call, image 1"][0].shape == (4, 1, 500, 700)
    assert set(ours["batched_output"][0]) == set(ref["batched_output"][0])
    assert_same_results(ours["results"], ref["results"])


# ---------------------------------------------------------------------- AMG notebook

AMG_NOTEBOOK = """
from PACKAGE import sam_model_registry, SamAutomaticMaskGenerator, SamPredictor

sam = sam_model_registry[model_type](checkpoint=sam_checkpoint)
sam.to(device=device)

mask_generator = SamAutomaticMaskGenerator(sam)
masks = mask_generator.generate(image)
keys = sorted(masks[0].keys())

mask_generator_2 = SamAutomaticMaskGenerator(
    model=sam,
    points_per_side=32,
    pred_iou_thresh=0.86,
    stability_score_thresh=0.92,
    crop_n_layers=1,
    crop_n_points_downscale_factor=2,
    min_mask_region_area=100,
)
masks2 = mask_generator_2.generate(image)


def overlay(anns):
    # as the notebook shows them: largest first, each painted over the ones before
    painted = np.zeros(anns[0]["segmentation"].shape, dtype=np.int32)
    for rank, ann in enumerate(sorted(anns, key=lambda a: a["area"], reverse=True)):
        painted[ann["segmentation"]] = rank + 1
    return painted


shown, shown2 = overlay(masks), overlay(masks2)
"""


def test_automatic_mask_generator_notebook(register, one_thread):
    from sam_factory import TINY_FAST

    pytest.importorskip("cv2", reason="the reference's min_mask_region_area needs OpenCV (test-only)")
    checkpoint = register(TINY_FAST, decisive=True, seed=7)  # a seed with several masks
    inputs = dict(image=scene(150, 225, 0), sam_checkpoint=checkpoint, model_type=MODEL_TYPE, device="cpu")
    ref = run_client(AMG_NOTEBOOK, "segment_anything", **inputs)
    ours = run_client(AMG_NOTEBOOK, "napari_sam", **inputs)
    assert ours["keys"] == ref["keys"] == sorted(
        ["segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"]
    )
    assert len(ref["masks"]) >= 3 and len(ref["masks2"]) >= 3
    assert_same_records(ours["masks"], ref["masks"])
    assert_same_records(ours["masks2"], ref["masks2"])
    for name in ("shown", "shown2"):
        assert np.mean(ours[name] == ref[name]) >= 0.99


# ---------------------------------------------------------------------- scripts/amg.py

AMG_SCRIPT = """
import json
import os

import cv2
from PACKAGE import SamAutomaticMaskGenerator, sam_model_registry

AMG_SETTINGS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
                "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh",
                "crop_overlap_ratio", "crop_n_points_downscale_factor", "min_mask_region_area")
COLUMNS = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
           "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h")


def save_binary_masks(masks, folder):
    rows = [COLUMNS]
    for i, record in enumerate(masks):
        cv2.imwrite(os.path.join(folder, f"{i}.png"), record["segmentation"] * 255)
        values = [i, record["area"], *record["bbox"], *record["point_coords"][0],
                  record["predicted_iou"], record["stability_score"], *record["crop_box"]]
        rows.append(",".join(str(v) for v in values))
    with open(os.path.join(folder, "metadata.csv"), "w") as f:
        f.write("\\n".join(rows) + "\\n")


def main(args):
    sam = sam_model_registry[args.model_type](checkpoint=args.checkpoint)
    _ = sam.to(device=args.device)
    output_mode = "coco_rle" if args.convert_to_rle else "binary_mask"
    settings = {k: getattr(args, k) for k in AMG_SETTINGS if getattr(args, k) is not None}
    generator = SamAutomaticMaskGenerator(sam, output_mode=output_mode, **settings)
    if os.path.isdir(args.input):
        targets = sorted(os.path.join(args.input, f) for f in os.listdir(args.input)
                         if not os.path.isdir(os.path.join(args.input, f)))
    else:
        targets = [args.input]
    os.makedirs(args.output, exist_ok=True)
    for target in targets:
        image = cv2.imread(target)
        if image is None:
            continue
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        masks = generator.generate(image)
        base = os.path.join(args.output, os.path.splitext(os.path.basename(target))[0])
        if output_mode == "binary_mask":
            os.makedirs(base, exist_ok=False)
            save_binary_masks(masks, base)
        else:
            with open(base + ".json", "w") as f:
                json.dump(masks, f)


main(args)
"""


def amg_arguments(argv: list[str]) -> argparse.Namespace:
    """The script's command line (the options it has that these runs use)."""
    parser = argparse.ArgumentParser()
    for name in ("--input", "--output", "--model-type", "--checkpoint"):
        parser.add_argument(name, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--convert-to-rle", action="store_true")
    for name, kind in [("points-per-side", int), ("points-per-batch", int), ("pred-iou-thresh", float),
                       ("stability-score-thresh", float), ("stability-score-offset", float),
                       ("box-nms-thresh", float), ("crop-n-layers", int), ("crop-nms-thresh", float),
                       ("crop-overlap-ratio", float), ("crop-n-points-downscale-factor", int),
                       ("min-mask-region-area", int)]:
        parser.add_argument(f"--{name}", type=kind, default=None)
    return parser.parse_args(argv)


def read_binary_output(folder: Path) -> list[dict]:
    import cv2

    with open(folder / "metadata.csv") as f:
        rows = list(csv.DictReader(f))
    records = []
    for row in rows:
        values = {k: float(v) for k, v in row.items()}  # ints and floats alike ("12" / "12.0")
        records.append({
            "segmentation": cv2.imread(str(folder / f"{int(values['id'])}.png"), cv2.IMREAD_GRAYSCALE) > 0,
            "area": values["area"],
            "bbox": [values[f"bbox_{k}"] for k in ("x0", "y0", "w", "h")],
            "point_coords": [[values["point_input_x"], values["point_input_y"]]],
            "predicted_iou": values["predicted_iou"],
            "stability_score": values["stability_score"],
            "crop_box": [values[f"crop_box_{k}"] for k in ("x0", "y0", "w", "h")],
        })
    return records


def read_rle_output(path: Path) -> list[dict]:
    from pycocotools import mask as mask_utils

    records = json.loads(path.read_text())
    for record in records:
        record["segmentation"] = mask_utils.decode(record["segmentation"]).astype(bool)
    return records


def test_amg_script(register, tmp_path, one_thread):
    from sam_factory import TINY_FAST

    cv2 = pytest.importorskip("cv2", reason="the script reads and writes images with OpenCV (test-only)")
    pytest.importorskip("pycocotools", reason="the script's --convert-to-rle needs pycocotools")
    checkpoint = register(TINY_FAST, decisive=True, seed=7)
    images = tmp_path / "images"
    images.mkdir()
    for k, shape in enumerate([(150, 225), (200, 140)]):
        cv2.imwrite(str(images / f"image{k}.png"), cv2.cvtColor(scene(*shape, k), cv2.COLOR_RGB2BGR))
    (images / "notes.txt").write_text("not an image: skipped")
    common = ["--input", str(images), "--model-type", MODEL_TYPE, "--checkpoint", checkpoint, "--device", "cpu"]
    runs = {
        "defaults": [],
        "rle, crops": ["--convert-to-rle", "--points-per-side", "16", "--crop-n-layers", "1",
                       "--pred-iou-thresh", "0.8", "--min-mask-region-area", "20"],
    }
    for run, extra in runs.items():
        out = {}
        for package in ("segment_anything", "napari_sam"):
            out[package] = tmp_path / f"{package}-{len(extra)}"
            args = amg_arguments([*common, "--output", str(out[package]), *extra])
            run_client(AMG_SCRIPT, package, args=args)
        ref_dir, our_dir = out["segment_anything"], out["napari_sam"]
        assert sorted(p.name for p in our_dir.iterdir()) == sorted(p.name for p in ref_dir.iterdir())
        for k in range(2):
            if "--convert-to-rle" in extra:
                ref, ours = read_rle_output(ref_dir / f"image{k}.json"), read_rle_output(our_dir / f"image{k}.json")
            else:
                ref, ours = read_binary_output(ref_dir / f"image{k}"), read_binary_output(our_dir / f"image{k}")
            assert len(ref) >= 1, run
            assert_same_records(ours, ref)


# ---------------------------------------------------------------------- MobileSAM README

MOBILE_SAM_README = """
from PACKAGE import sam_model_registry, SamAutomaticMaskGenerator, SamPredictor

model_type = "vit_t"
mobile_sam = sam_model_registry[model_type](checkpoint=sam_checkpoint)
mobile_sam.to(device=device)
mobile_sam.eval()

predictor = SamPredictor(mobile_sam)
predictor.set_image(image)
results = {}
masks, scores, _ = predictor.predict(point_coords=np.array([[300, 200]]), point_labels=np.array([1]))
results["click"] = (masks, scores)
masks, scores, _ = predictor.predict(box=np.array([100, 80, 420, 300]), multimask_output=False)
results["box"] = (masks, scores)
"""


def test_mobile_sam_readme(tmp_path):
    """vit_t at its real size; the README's automatic-mask part decodes 1024 points with the
    full decoder (about a minute for the reference here), which the notebook test covers."""
    from sam_factory import perturb_

    import napari_sam

    ms = import_mobile_sam()
    ref_random = ms.sam_model_registry["vit_t"]()
    ours_random = napari_sam.sam_model_registry["vit_t"]()  # random init, as the reference
    assert set(ours_random.state_dict()) == set(ref_random.state_dict())
    path = tmp_path / "mobile_sam.pt"
    torch.save(perturb_(ref_random, seed=2).state_dict(), path)
    inputs = dict(image=scene(360, 480, 3), sam_checkpoint=str(path), device="cpu")
    ref = run_client(MOBILE_SAM_README, "mobile_sam", **inputs)
    ours = run_client(MOBILE_SAM_README, "napari_sam", **inputs)
    assert ours["mobile_sam"].encoder_dtype is None  # float32 as the reference
    assert_same_results(ours["results"], ref["results"])
