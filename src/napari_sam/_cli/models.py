"""``napari-sam models``: the models known by name, grouped by imaging domain."""

from __future__ import annotations

from ..model.zoo import models_by_domain


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "models", help="list the model names --model accepts",
        description="List the models napari-sam downloads by name (once, into its cache), "
                    "grouped by imaging domain. 'AIS' marks models with an instance-"
                    "segmentation decoder (everything --mode ais/apg).")
    parser.set_defaults(func=run)


def run(args) -> int:
    for domain, models in models_by_domain():
        print(f"{domain}:")
        for m in models:
            tag = "AIS" if m.has_decoder else "   "
            print(f"  {m.name:<24}{tag}  {m.description}")
    return 0
