"""Subcommands of the ``napari-sam`` command line (see ``napari_sam.cli``)."""
