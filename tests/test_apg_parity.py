"""Automatic prompt generation (APG): ours against micro-sam's ``AutomaticPromptGenerator``.

micro-sam (test-only: scripts/setup_env.sh --testing) runs with the reference
``segment_anything.SamPredictor``; ours with our predictor. Decoder outputs are the perfect
ones of a synthetic cell label image (tests/instance_targets.py). Three comparisons:

* prompts: exactly micro-sam's points, same order (also for images larger than micro-sam's
  512 x 512 blocks, whose numbering differs from row-major order);
* oracle model (tests/oracle.py, behind both predictors): masks are the true cells and every
  other cell has two seeds (two prompts, duplicate masks for the NMS) — the label images
  must be equal, ids included;
* random SAM weights (a 1024-input model with a reduced encoder and decoder, identical
  weights for both): masks are arbitrary textures that fall apart into many objects when
  painted; parameters and seeds are chosen such that at least 15 objects survive; every
  object matched one-to-one with IoU >= 0.99 (float differences in the logits may flip a
  few pixels; on this machine the label images are identical).

Box refinement is compared on square images: micro-sam clips the boxes of non-square ones
at the wrong sides (see napari_sam.engine.prompt_generation), we do not.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from instance_targets import decoder_targets_from_labels, synthetic_cells
from reference_shim import import_segment_anything

from napari_sam.engine import prompt_generation as pg
from napari_sam.engine.automatic import Progress
from napari_sam.engine.predictor import SamPredictor
from napari_sam.engine.prompt_generation import (
    ApgParameters,
    instances_from_prompts,
    point_prompts_from_decoder_outputs,
    prompt_generation_job,
)


def import_micro_sam():
    import_segment_anything()  # the torchvision shim first
    try:
        from micro_sam import instance_segmentation
    except ImportError as exc:
        pytest.skip(f"micro-sam is not installed (test-only: scripts/setup_env.sh --testing): {exc}")
    if not hasattr(instance_segmentation, "AutomaticPromptGenerator"):
        pytest.skip("micro-sam < 1.7 has no AutomaticPromptGenerator (scripts/setup_env.sh --testing)")
    return instance_segmentation


def micro_sam_labels(reference_predictor, maps, params: ApgParameters) -> np.ndarray:
    ms = import_micro_sam()
    apg = ms.AutomaticPromptGenerator(reference_predictor, None)
    foreground, center, boundary = maps
    apg.set_state({"foreground": foreground, "center_distances": center, "boundary_distances": boundary})
    kwargs = {k: getattr(params, k) for k in ApgParameters.__dataclass_fields__}
    return apg.generate(**kwargs)


def matched_ious(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """IoU of each reference object with the object of ours it overlaps most; asserts the
    matching is one-to-one."""
    ids_ref = np.unique(ref[ref > 0])
    assert len(np.unique(ours[ours > 0])) == len(ids_ref)
    area_ours = np.bincount(ours.ravel())
    ious, partners = [], []
    for i in ids_ref:
        mask = ref == i
        j = int(np.bincount(ours[mask]).argmax())
        inter = int(np.count_nonzero(ours[mask] == j))
        ious.append(0.0 if j == 0 else inter / (mask.sum() + area_ours[j] - inter))
        partners.append(j)
    assert len(set(partners)) == len(partners)
    return np.array(ious)


# ---------------------------------------------------------------------- prompts
def smooth_maps(shape, sigma, seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(3):
        f = ndimage.gaussian_filter(rng.random(shape), sigma)
        maps.append(((f - f.min()) / (f.max() - f.min())).astype(np.float32))
    return tuple(maps)


@pytest.mark.parametrize(
    "maps",
    [
        lambda: decoder_targets_from_labels(synthetic_cells((256, 256), 40, 0)),
        lambda: decoder_targets_from_labels(synthetic_cells((600, 1100), 120, 1, radius=(6, 40))),
        lambda: smooth_maps((700, 530), 3, 2),  # thousands of seeds across 4 blocks
        lambda: smooth_maps((1030, 300), 25, 3),  # seeds larger than the distance halo
    ],
    ids=["cells-256", "cells-600x1100", "noise-700x530", "blobs-1030x300"],
)
def test_prompts_equal_micro_sam(maps):
    ms = import_micro_sam()
    maps = maps()
    ref = ms._derive_point_prompts(*maps)
    ours = point_prompts_from_decoder_outputs(*maps)
    assert len(ours) >= 10
    assert ours.dtype == np.float64 and ours.shape == (len(ref["points"]), 2)
    np.testing.assert_array_equal(ours, ref["points"][:, 0])


def test_prompts_on_the_border_and_thresholds():
    """Seeds whose distances are all 0 (one pixel wide on the image border) get the corner of
    their bounding box, as micro-sam's argmax does; thresholds are passed through."""
    ms = import_micro_sam()
    fg = np.zeros((40, 50), np.float32)
    fg[0, 5:15] = 1.0  # on the top border: all distances 0
    fg[10:20, 10:25] = 0.6
    fg[30:39, 30:49] = 1.0
    center, boundary = np.zeros_like(fg), np.zeros_like(fg)
    for t in (0.5, 0.7):
        ref = ms._derive_point_prompts(fg, center, boundary, foreground_threshold=t)
        ours = point_prompts_from_decoder_outputs(fg, center, boundary, foreground_threshold=t)
        np.testing.assert_array_equal(ours, ref["points"][:, 0])
    assert point_prompts_from_decoder_outputs(fg, center, boundary, foreground_threshold=0.5)[0].tolist() == [5, 0]
    empty = point_prompts_from_decoder_outputs(np.zeros_like(fg), center, boundary)
    assert empty.shape == (0, 2)


def test_blockwise_numbering_equals_elf():
    """Ids of regions numbered as micro-sam's block-wise labelling (elf.parallel.label)."""
    import_micro_sam()
    from elf.parallel import label as elf_label

    labels = synthetic_cells((700, 1100), 150, 4, radius=(5, 30))
    labels[labels % 3 == 0] = 1  # equal values that touch stay separate only if not adjacent
    ref = elf_label(labels.astype(np.uint32), out=np.zeros(labels.shape, np.uint32), block_shape=(512, 512))
    np.testing.assert_array_equal(pg._label_blockwise(labels), ref)


def test_refinement_boxes():
    """micro-sam's box prompts around the masks on a square image; on a wide one the same
    except where micro-sam clips x at the height (it turns those boxes inside out)."""
    ms = import_micro_sam()
    rng = np.random.default_rng(0)
    x0, y0 = rng.integers(0, 170, 200), rng.integers(0, 90, 200)  # masks inside (120, 200)
    boxes = np.stack([x0, y0, x0 + rng.integers(0, 30, 200), y0 + rng.integers(0, 30, 200)], axis=1)
    boxes[:5] = 0  # empty masks: box [0, 0, 0, 0]

    def reference(shape):
        records = [{"segmentation": np.zeros(shape, bool), "bbox": [a, b, c - a, d - b]} for a, b, c, d in boxes]
        return ms._derive_box_prompts(records, 0.01)["boxes"]

    np.testing.assert_array_equal(pg._refinement_boxes(boxes, (200, 200)), reference((200, 200)))
    ours, ref = pg._refinement_boxes(boxes, (120, 200)), reference((120, 200))
    assert (ours[:, 2] >= ours[:, 0]).all() and (ours[:, 3] >= ours[:, 1]).all()
    assert ours[:, [0, 2]].max() <= 200 and ours[:, [1, 3]].max() <= 120
    assert (ref[:, 2] < ref[:, 0]).any()  # micro-sam: inside-out boxes right of x = 120
    same = (ref[:, 2] < 120) & (ref[:, 3] < 120)  # where neither clip bites
    np.testing.assert_array_equal(ours[same], ref[same])


# ---------------------------------------------------------------------- oracle model
@pytest.fixture(scope="module")
def oracle_scene():
    """(reference predictor, ours, decoder outputs, labels): 20 cells with distinct
    intensities, seen by one oracle (1024 input, as micro-sam's transform assumes). Ours
    holds the reference's embedding (``set_embedding``), so the oracle's memo of answered
    regions serves both."""
    from test_automatic_oracle import FastOracle, reference_view

    from napari_sam.engine.predictor import ImageEmbedding

    sa = import_segment_anything()
    labels = synthetic_cells((192, 192), 20, 3)
    intensities = np.random.default_rng(0).permutation(np.linspace(40, 250, labels.max()))
    image = np.zeros(labels.shape, np.uint8)
    image[labels > 0] = intensities[labels[labels > 0] - 1].astype(np.uint8)
    oracle = FastOracle()
    ref = sa.SamPredictor(reference_view(oracle))
    ref.set_image(np.repeat(image[..., None], 3, axis=-1))
    ours = SamPredictor(oracle)
    ours.set_embedding(ImageEmbedding(ref.features, ref.original_size, ref.input_size, oracle.signature))
    return ref, ours, split_seeds(decoder_targets_from_labels(labels), labels), labels


def split_seeds(maps, labels):
    """An imperfect decoder: a ridge of centre distance 1 across every other cell's centre
    row splits its seed in two, so two prompts give the same mask (NMS has work to do)."""
    foreground, center, boundary = (m.copy() for m in maps)
    for k in range(1, labels.max() + 1, 2):
        rows = np.nonzero(labels == k)[0]
        ridge = np.zeros_like(labels, dtype=bool)
        ridge[int(rows.mean())] = True
        center[ridge & (labels == k)] = 1.0
    return foreground, center, boundary


ORACLE_CASES = {
    "defaults": ApgParameters(),
    "multimasking": ApgParameters(multimasking=True, batch_size=8),
    "refine-boxes": ApgParameters(refine_with_box_prompts=True),
    "intersection-over-min": ApgParameters(intersection_over_min=True, nms_threshold=0.5, min_size=40),
}


@pytest.mark.parametrize("name", list(ORACLE_CASES))
def test_oracle_label_image_equals_micro_sam(oracle_scene, name):
    ref_predictor, ours_predictor, maps, labels = oracle_scene
    params = ORACLE_CASES[name]
    ref = micro_sam_labels(ref_predictor, maps, params)
    ours = instances_from_prompts(ours_predictor, *maps, params)
    assert ours.dtype == np.uint32 and ours.shape == labels.shape
    assert ours.max() >= 15
    assert len(point_prompts_from_decoder_outputs(*maps)) >= ours.max() + 5  # NMS dropped duplicates
    np.testing.assert_array_equal(ours, ref)


# ---------------------------------------------------------------------- random weights
# A 1024 input (micro-sam's transform assumes it) with a reduced encoder and decoder.
RANDOM_CASES = {  # name: (parameters, weights seed); each leaves >= 15 objects
    "defaults": (ApgParameters(), 8),
    "multimasking": (ApgParameters(multimasking=True), 6),
    "refine-boxes": (ApgParameters(refine_with_box_prompts=True), 8),
    "intersection-over-min": (ApgParameters(intersection_over_min=True), 8),
    "mask-threshold": (ApgParameters(mask_threshold=-0.5, batch_size=5), 6),
}


@pytest.fixture(scope="module")
def random_scene(tmp_path_factory):
    """(seed -> (reference predictor, ours) on identical random weights, both holding the
    same image; decoder outputs of 11 cells)."""
    from sam_factory import reference_sam, save_checkpoint

    from napari_sam import build_sam
    from napari_sam.model import SamConfig, ViTConfig

    sa = import_segment_anything()
    config = SamConfig(
        "vit_b", "vit", ViTConfig(embed_dim=32, depth=1, num_heads=2, global_attn_indexes=(0,)),
        img_size=1024, prompt_embed_dim=64, decoder_depth=1, decoder_mlp_dim=128, decoder_heads=2,
    )
    labels = synthetic_cells((256, 256), 12, 0)
    rng = np.random.default_rng(0)
    image = np.where(labels[..., None] > 0, 200, 40).astype(np.uint8).repeat(3, axis=-1)
    image = (image + rng.normal(0, 10, image.shape)).clip(0, 255).astype(np.uint8)
    predictors = {}

    def get(seed: int):
        if seed not in predictors:
            torch.manual_seed(0)
            ref_model = reference_sam(config, seed=seed)
            path = save_checkpoint(ref_model, tmp_path_factory.mktemp("apg") / "random.pth")
            ours = SamPredictor(build_sam(config, checkpoint=path, device="cpu", precision="fp32"))
            ref = sa.SamPredictor(ref_model)
            ref.set_image(image)
            ours.set_image(image)
            predictors[seed] = ref, ours
        return predictors[seed]

    return get, decoder_targets_from_labels(labels)


@pytest.mark.parametrize("name", list(RANDOM_CASES))
def test_random_weights_instances_equal_micro_sam(random_scene, name):
    get, maps = random_scene
    params, seed = RANDOM_CASES[name]
    ref_predictor, ours_predictor = get(seed)
    ref = micro_sam_labels(ref_predictor, maps, params)
    ours = instances_from_prompts(ours_predictor, *maps, params)
    assert ref.max() >= 15
    ious = matched_ious(ours, ref)
    assert ious.min() >= 0.99, f"{len(ious)} objects, worst IoU {ious.min():.4f}"


# ---------------------------------------------------------------------- job behaviour
def test_progress_per_batch_and_cancel(oracle_scene):
    _, ours, maps, _ = oracle_scene
    n = len(point_prompts_from_decoder_outputs(*maps))
    params = ApgParameters(batch_size=4, refine_with_box_prompts=True)
    steps = []
    result = instances_from_prompts(ours, *maps, params, callback=steps.append)
    batches = -(-n // 4)
    assert [s.done for s in steps] == list(range(1, 2 * batches + 1))
    assert all(isinstance(s, Progress) and s.total == 2 * batches for s in steps)
    assert steps[0].message == f"points 4/{n}" and steps[-1].message == f"boxes {n}/{n}"
    assert result.max() >= 15

    cancel = threading.Event()
    job = prompt_generation_job(ours, *maps, params, cancel=cancel)
    next(job)
    calls = ours.model.decode_calls
    cancel.set()
    with pytest.raises(StopIteration) as stop:
        next(job)
    assert stop.value.value is None  # cancelled: returns None, decodes nothing more
    assert ours.model.decode_calls == calls


def test_no_seed_gives_an_empty_label_image(oracle_scene):
    _, ours, maps, _ = oracle_scene
    labels = instances_from_prompts(ours, np.zeros_like(maps[0]), maps[1], maps[2])
    assert labels.dtype == np.uint32 and labels.shape == maps[0].shape and not labels.any()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"min_size": -1}, "expected min_size an integer >= 0, got -1"),
        ({"min_size": 2.5}, "expected min_size an integer >= 0, got 2.5"),
        ({"batch_size": 0}, "expected batch_size an integer >= 1, got 0"),
        ({"nms_threshold": 1.5}, "expected nms_threshold a number in [0, 1], got 1.5"),
        ({"foreground_threshold": float("nan")}, "expected foreground_threshold a number in [0, 1], got nan"),
        ({"center_distance_threshold": "0.5"}, "expected center_distance_threshold a number in [0, 1], got '0.5'"),
        ({"multimasking": 1}, "expected multimasking True or False, got 1"),
        ({"mask_threshold": "auto"}, "local-Otsu 'auto' is not supported"),
        ({"mask_threshold": float("inf")}, "expected mask_threshold None or a finite number, got inf"),
    ],
)
def test_parameters_are_validated(changes, message):
    params = ApgParameters(**changes)
    with pytest.raises(ValueError, match="^expected") as err:
        params.validate()
    assert message in str(err.value)


def test_inputs_are_validated(oracle_scene):
    _, ours, maps, _ = oracle_scene
    with pytest.raises(ValueError, match=r"expected center_distances of the image's size \(192, 192\), got shape \(192, 190\)"):
        instances_from_prompts(ours, maps[0], maps[1][:, :190], maps[2])
    with pytest.raises(ValueError, match="expected batch_size"):  # at the call, before any work
        prompt_generation_job(ours, *maps, ApgParameters(batch_size=0))
    with pytest.raises(ValueError, match="expected finite values in foreground"):
        prompt_generation_job(ours, np.full_like(maps[0], np.nan), maps[1], maps[2])
    with pytest.raises(ValueError, match="expected a predictor holding the image's embedding"):
        instances_from_prompts(SamPredictor(ours.model), *maps)
    with pytest.raises(ValueError, match="expected foreground_threshold"):
        point_prompts_from_decoder_outputs(*maps, foreground_threshold=2.0)
