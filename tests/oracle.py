"""An oracle "model" with SAM's engine interface, for testing geometry end to end.

Random weights cannot tell whether a click lands on the right object after resizing,
padding, scale/translate and slicing. The oracle can: its "embedding" is the grayscale
model input itself, packed into the usual (1, C, S/16, S/16) shape (C * (S/16)^2 == S^2
for C = 256), so it travels through every cache and store like a real embedding. Test
images draw each object with its own non-zero intensity on a zero background, so "the
region under the click" is exactly "the true object". A *region* is a connected set of
pixels of (nearly, within TOLERANCE) constant non-zero intensity.

Its decoder, per prompt (everything in the padded (S, S) model-input frame):

* mask prior: a ``mask_input`` (low-res logits) is upsampled to (S, S) bilinearly, as
  ``postprocess_masks`` does, and thresholded at 0: the prior ``M``. So a prompt that was
  resized, padded or scaled wrongly lands elsewhere.
* base object:
  - box without mask: the largest connected non-zero area inside the box (clipped to it;
    touching objects of different intensity merge);
  - box with mask: of those connected areas inside the box, the one overlapping ``M``
    most (ties: the larger); if ``M`` overlaps none, as without mask;
  - mask without box: the region of the intensity most common under ``M`` (an object's
    interior, exact where its border is blurred) that overlaps ``M`` most; empty when
    ``M`` covers only background or padding. So a mask prompt follows its object from
    slice to slice, its shape taken from the image, not copied from ``M``;
  - neither: empty.
* then the region under each positive point is added, the region under each negative
  point removed (a point on the background gives the background region).

Multimask output gives three candidates: the object eroded (predicted IoU 0.5), the object
(0.9), and the object dilated (0.6) — so "best candidate" logic is exercised too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

TOLERANCE = 2.5  # intensity levels; bilinear resizing blurs only the object borders


class OracleSam:
    mask_threshold = 0.0
    image_format = "RGB"

    def __init__(self, image_size: int = 1024, embed_dim: int = 256) -> None:
        if embed_dim * (image_size // 16) ** 2 != image_size**2:
            raise ValueError("expected embed_dim * (image_size/16)^2 == image_size^2")
        self.image_size = image_size
        self.embed_dim = embed_dim
        self.device = torch.device("cpu")
        self.signature = f"oracle:{image_size}"
        self.model_type = "oracle"
        self.encode_calls = 0
        self.decode_calls = 0

    # -- encoder side -----------------------------------------------------------
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) in [0, 255] -> (B, 3, S, S) gray, padding = -1."""
        gray = x.float().mean(1, keepdim=True)
        h, w = gray.shape[-2:]
        padded = F.pad(gray, (0, self.image_size - w, 0, self.image_size - h), value=-1.0)
        return padded.expand(-1, 3, -1, -1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.encode_calls += 1
        s, g = self.image_size, self.image_size // 16
        return x[:, 0].reshape(x.shape[0], self.embed_dim, g, g).clone()

    def image_side_cache(self, features: torch.Tensor):
        return None

    def postprocess_masks(self, masks, input_size, original_size):
        s = self.image_size
        masks = F.interpolate(masks, (s, s), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    # -- decoder side -----------------------------------------------------------
    def _image(self, features: torch.Tensor) -> np.ndarray:
        s = self.image_size
        return features.reshape(s, s).float().cpu().numpy()

    @staticmethod
    def _region_at(img: np.ndarray, x: float, y: float) -> np.ndarray:
        s = img.shape[0]
        r, c = int(np.clip(np.floor(y), 0, s - 1)), int(np.clip(np.floor(x), 0, s - 1))
        value = img[r, c]
        if value < 0:  # padding
            return np.zeros_like(img, dtype=bool)
        same = np.abs(img - value) <= TOLERANCE
        labels, _ = ndimage.label(same)
        return labels == labels[r, c]

    @staticmethod
    def _box_areas(img: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, int]:
        """Connected non-zero areas inside ``box`` (x0 y0 x1 y1, model-input pixels):
        (S, S) int labels (0 outside), their number."""
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        inside = np.zeros_like(img, dtype=bool)
        inside[max(y0, 0) : max(y1, 0) + 1, max(x0, 0) : max(x1, 0) + 1] = True
        return ndimage.label((img > TOLERANCE) & inside)

    @classmethod
    def _largest_in_box(cls, img: np.ndarray, box: np.ndarray) -> np.ndarray:
        labels, n = cls._box_areas(img, box)
        if n == 0:
            return np.zeros_like(img, dtype=bool)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        return labels == (1 + int(np.argmax(sizes)))

    def _in_box(self, img: np.ndarray, box: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
        """Box prompt, with the mask prior ``prior`` ((S, S) bool) choosing between areas."""
        if prior is not None:
            labels, n = self._box_areas(img, box)
            overlap = np.bincount(labels[prior], minlength=n + 1)[1:]
            if n and overlap.max() > 0:
                sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
                best = max(range(n), key=lambda k: (overlap[k], sizes[k], -k))
                return labels == best + 1
        return self._largest_in_box(img, box)

    @staticmethod
    def _region_under(img: np.ndarray, prior: np.ndarray) -> np.ndarray:
        """The region of the intensity most common under ``prior`` ((S, S) bool) that
        overlaps it most; empty if it covers only background or padding."""
        under = img[prior]  # (P,) intensities under the prior
        values, counts = np.unique(under[under > TOLERANCE], return_counts=True)
        if not len(values):
            return np.zeros_like(img, dtype=bool)
        value = values[np.argmax(counts)]  # an object's interior: exact, unlike its blurred border
        labels, n = ndimage.label(np.abs(img - value) <= TOLERANCE)
        overlap = np.bincount(labels[prior], minlength=n + 1)
        overlap[0] = 0
        return labels == int(np.argmax(overlap))

    def decode(
        self,
        features,
        points_xy=None,
        point_labels=None,
        boxes_xyxy=None,
        mask_input=None,
        multimask_output=True,
        cache=None,
    ):
        self.decode_calls += 1
        img = self._image(features)
        s = self.image_size
        batch = next(t.shape[0] for t in (points_xy, boxes_xyxy, mask_input) if t is not None)
        low = []
        for b in range(batch):
            prior = None
            if mask_input is not None:  # (1, h, w) logits -> (S, S) bool, as postprocess_masks
                up = F.interpolate(mask_input[b : b + 1].float(), (s, s), mode="bilinear",
                                   align_corners=False)
                prior = up[0, 0].cpu().numpy() > 0
            if boxes_xyxy is not None:
                mask = self._in_box(img, boxes_xyxy[b].cpu().numpy(), prior)
            elif prior is not None:
                mask = self._region_under(img, prior)
            else:
                mask = np.zeros((s, s), dtype=bool)
            if points_xy is not None:
                for (x, y), label in zip(points_xy[b].tolist(), point_labels[b].tolist()):
                    if label == 1:
                        mask |= self._region_at(img, x, y)
                for (x, y), label in zip(points_xy[b].tolist(), point_labels[b].tolist()):
                    if label == 0:
                        mask &= ~self._region_at(img, x, y)
            candidates = [ndimage.binary_erosion(mask, iterations=8), mask, ndimage.binary_dilation(mask, iterations=8)]
            if not multimask_output:
                candidates = [mask]
            low.append(torch.stack([self._to_low_res_logits(m) for m in candidates]))
        iou = torch.tensor([0.5, 0.9, 0.6] if multimask_output else [0.9]).expand(batch, -1)
        return torch.stack(low), iou.clone()

    def _to_low_res_logits(self, mask: np.ndarray) -> torch.Tensor:
        """(S, S) bool -> (S/4, S/4) logits: area fraction mapped to +-10."""
        t = torch.from_numpy(mask.astype(np.float32))[None, None]
        frac = F.avg_pool2d(t, 4)[0, 0]
        return (frac - 0.5) * 20.0


class OracleInstanceDecoder:
    """The oracle's AIS decoder: ``(features, input_size, original_size) -> (1, 3, H, W)``
    perfect maps (:func:`instance_targets.decoder_targets_from_labels`) of the objects of
    the encoded image — each connected region of one non-zero intensity is an object —
    cropped to ``input_size`` and resized (nearest) to ``original_size`` as the real
    decoder's output is. Wrong crops, resizes or planes give maps of the wrong objects."""

    def __init__(self, oracle: OracleSam) -> None:
        self.oracle = oracle
        self.calls = 0

    def __call__(self, features, input_size, original_size) -> torch.Tensor:
        from instance_targets import decoder_targets_from_labels

        self.calls += 1
        img = self.oracle._image(features)[: input_size[0], : input_size[1]]
        objects = np.zeros(img.shape, np.int32)
        intensity = [0.0]  # per object id
        values = np.unique(np.round(img[img > TOLERANCE]))
        for value in values:  # one intensity: the connected regions of its interior are objects
            # (eroded: a run of one value along a blurred edge is no object)
            interior = ndimage.binary_erosion(np.abs(img - value) <= 0.5, np.ones((3, 3), bool))
            pieces, n = ndimage.label(interior)
            for k in range(1, n + 1):
                objects[pieces == k] = len(intensity)
                intensity.append(float(value))
        # resizing blurred the borders: a border pixel at least half as bright as the nearest
        # object belongs to it (the edge of a blurred step is where it crosses half height)
        from skimage.segmentation import expand_labels

        grown = expand_labels(objects, distance=3)
        objects = np.where(img >= 0.5 * np.asarray(intensity)[grown], grown, 0)
        objects[img <= TOLERANCE] = 0
        h, w = original_size
        rows = np.minimum((np.arange(h) + 0.5) * img.shape[0] / h, img.shape[0] - 1).astype(int)
        cols = np.minimum((np.arange(w) + 0.5) * img.shape[1] / w, img.shape[1] - 1).astype(int)
        maps = decoder_targets_from_labels(objects[np.ix_(rows, cols)])
        return torch.from_numpy(np.stack(maps))[None]

    def to(self, *args, **kwargs):
        return self

    def eval(self):
        return self


def with_instance_decoder(oracle: OracleSam) -> OracleSam:
    """``oracle`` with an AIS decoder (``oracle.instance_decoder``), e.g. for mode "ais"."""
    oracle.instance_decoder = OracleInstanceDecoder(oracle)
    return oracle
