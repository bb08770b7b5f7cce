"""Command line: ``napari-sam <command> …`` over the engine only (no napari, no Qt).

Each command lives in ``napari_sam._cli.<name>`` and provides ``add_parser(subparsers)``
(registering its arguments and ``func``) and returns an exit code from ``func(args)``.

Ctrl-C at any point of :func:`main` (imports of the commands, model loading, the work,
writing) exits with code 130 and one line, never a traceback. Commands import the
engine (torch) lazily, inside :func:`main`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("everything", "embed", "models")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-sam", description="Segment Anything for microscopy, without a viewer."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"napari_sam._cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"napari_sam._cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("napari-sam: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
