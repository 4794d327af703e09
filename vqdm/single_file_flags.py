"""The command-line flags for reading a single-file SDXL checkpoint (vqdm/models/single_file.py).

Standard library only: the server's parser module adds them too, and it imports nothing heavier."""
from __future__ import annotations

import argparse

FAMILIES = ("sdxl", "sdxl-turbo")


def add_single_file_flags(parser: argparse.ArgumentParser) -> None:
    """--family, --vae, --config: how a command reads a single-file checkpoint given as its model."""
    g = parser.add_argument_group("single-file checkpoints (.safetensors in the original SDXL layout)")
    g.add_argument("--family", choices=FAMILIES,
                   help="model family when the file's metadata does not say (weights alone cannot tell Turbo "
                        "from SDXL; default: the metadata, else sdxl)")
    g.add_argument("--vae", metavar="FILE_OR_FOLDER",
                   help="VAE for a file without one baked in (first_stage_model.*): a VAE .safetensors "
                        "(original or diffusers layout) or a diffusers VAE / pipeline folder")
    g.add_argument("--config", metavar="PRESET",
                   help="architecture preset of the file, e.g. tiny-sdxl (default: the packaged preset whose "
                        "shapes it matches)")
