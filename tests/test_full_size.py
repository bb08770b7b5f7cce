"""Full-size vit_b parity with the reference (one encoder pass each, ~30 s on 2 cores)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference_shim import import_segment_anything


@pytest.mark.slow
def test_full_size_vit_b_matches_reference(tmp_path):
    sa = import_segment_anything()
    from sam_factory import perturb_

    from napari_sam import SamPredictor, build_sam

    torch.manual_seed(0)
    ref_model = perturb_(sa.sam_model_registry["vit_b"](), seed=3).eval()
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(ref_model.state_dict(), path)
    ours = build_sam("vit_b", checkpoint=path, device="cpu", precision="fp32")

    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (600, 900, 3), dtype=np.uint8)
    ref = sa.SamPredictor(ref_model)
    ref.set_image(image)
    pred = SamPredictor(ours)
    pred.set_image(image)
    emb_ref, emb_ours = ref.get_image_embedding(), pred.get_image_embedding()
    assert float((emb_ours - emb_ref).norm() / emb_ref.norm()) <= 1e-4

    for kwargs in (
        dict(point_coords=np.array([[450.0, 300.0]]), point_labels=np.array([1])),
        dict(box=np.array([100.0, 50.0, 700.0, 500.0])),
    ):
        m_ref, s_ref, _ = ref.predict(**kwargs)
        m_ours, s_ours, _ = pred.predict(**kwargs)
        for a, b in zip(m_ours, m_ref):
            union = np.logical_or(a, b).sum()
            assert union == 0 or np.logical_and(a, b).sum() / union >= 0.99
        np.testing.assert_allclose(s_ours, s_ref, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_full_size_vit_t_matches_mobile_sam(tmp_path):
    """MobileSAM (vit_t) end to end through the predictor, against MobileSAM's own code."""
    from reference_shim import import_mobile_sam
    from sam_factory import perturb_

    from napari_sam import SamPredictor, build_sam

    ms = import_mobile_sam()
    ref_model = perturb_(ms.sam_model_registry["vit_t"](), seed=4)
    ref_model.eval()  # MobileSAM caches its attention biases in eval(): refresh after perturbing
    path = tmp_path / "mobile_sam_random.pt"
    torch.save(ref_model.state_dict(), path)
    ours = SamPredictor(build_sam("vit_t", checkpoint=path, device="cpu", precision="fp32"))

    image = np.random.default_rng(2).integers(0, 255, (500, 700, 3), dtype=np.uint8)
    ref = ms.SamPredictor(ref_model)
    with torch.inference_mode():
        ref.set_image(image)
    ours.set_image(image)
    emb_ref, emb_ours = ref.get_image_embedding(), ours.get_image_embedding()
    assert float((emb_ours - emb_ref).norm() / emb_ref.norm()) <= 1e-4
    kwargs = dict(point_coords=np.array([[300.0, 200.0]]), point_labels=np.array([1]))
    with torch.inference_mode():
        m_ref, s_ref, _ = ref.predict(**kwargs)
    m_ours, s_ours, _ = ours.predict(**kwargs)
    for a, b in zip(m_ours, m_ref):
        union = np.logical_or(a, b).sum()
        assert union == 0 or np.logical_and(a, b).sum() / union >= 0.99
    np.testing.assert_allclose(s_ours, s_ref, rtol=1e-3, atol=1e-4)
