"""The model zoo: every model napari-sam knows by name, grouped by imaging domain.

A zoo name ("vit_b_lm", "vit_t", …) stands for an architecture of
:data:`~napari_sam.model.config.MODEL_CONFIGS` plus published weights (see
the engine's weights module for where they are downloaded from). micro-sam's fine-tuned
models keep SAM's architecture unchanged; most also publish an instance-segmentation
decoder (``has_decoder``) for automatic instance segmentation (AIS) and prompt generation
(APG).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import MODEL_CONFIGS, SamConfig

# Display order of the domains (the widget's model picker groups by these).
DOMAINS = ("general", "light microscopy", "electron microscopy", "histopathology", "medical imaging")


@dataclass(frozen=True)
class ZooModel:
    """A model known by name.

    Attributes:
        name: what users type ("vit_b_lm").
        architecture: key of ``MODEL_CONFIGS`` ("vit_b").
        domain: one of :data:`DOMAINS`.
        description: one line for pickers and ``--help``.
        has_decoder: weights for an AIS decoder are published with it.
    """

    name: str
    architecture: str
    domain: str
    description: str
    has_decoder: bool = False


_SIZE = {"vit_t": "tiny, fast on a CPU", "vit_b": "base", "vit_l": "large", "vit_h": "huge"}

ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("vit_t", "vit_t", "general", "MobileSAM: SAM distilled into TinyViT; fast on a CPU"),
        ZooModel("vit_b", "vit_b", "general", "Segment Anything (Meta), base"),
        ZooModel("vit_l", "vit_l", "general", "Segment Anything (Meta), large"),
        ZooModel("vit_h", "vit_h", "general", "Segment Anything (Meta), huge"),
        *(
            ZooModel(f"{arch}_lm", arch, "light microscopy",
                     f"micro-sam, cells and nuclei in light microscopy ({_SIZE[arch]})", True)
            for arch in ("vit_t", "vit_b", "vit_l")
        ),
        *(
            ZooModel(f"{arch}_em_organelles", arch, "electron microscopy",
                     f"micro-sam, mitochondria, nuclei and other organelles in EM ({_SIZE[arch]})",
                     True)
            for arch in ("vit_t", "vit_b", "vit_l")
        ),
        *(
            ZooModel(f"{arch}_histopathology", arch, "histopathology",
                     f"micro-sam, nuclei in H&E and other histopathology stains ({_SIZE[arch]})",
                     True)
            for arch in ("vit_b", "vit_l", "vit_h")
        ),
        ZooModel("vit_b_medical_imaging", "vit_b", "medical imaging",
                 "micro-sam (MedicoSAM), organs and lesions in CT, MRI, ultrasound… (base)", True),
    )
}
assert all(m.architecture in MODEL_CONFIGS and m.domain in DOMAINS for m in ZOO.values())


def zoo_model(name: str) -> ZooModel:
    """The zoo entry called ``name``; ValueError naming the known ones otherwise."""
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"expected a model name in {list(ZOO)}, got {name!r}") from None


def zoo_config(name: str) -> SamConfig:
    """The architecture config of zoo model ``name``, carrying that name (so the model's
    ``model_type`` and cache keys say which weights it has)."""
    return MODEL_CONFIGS[zoo_model(name).architecture].with_changes(name=name)


def models_by_domain() -> list[tuple[str, list[ZooModel]]]:
    """[(domain, [models…]), …] in :data:`DOMAINS` order, models in registry order."""
    return [(d, [m for m in ZOO.values() if m.domain == d]) for d in DOMAINS]
