"""`vqdm` command line. Each area registers its subcommands; library code raises, this turns
errors into one-line messages and exit codes."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from vqdm import __version__
from vqdm.errors import VQDMError

# Modules providing `register(subparsers)`; each subcommand sets `func(args) -> int`.
COMMAND_MODULES = (
    "vqdm.models.cli",
    "vqdm.quantizer.quantize.cli",
    "vqdm.quantizer.distill.cli",
    "vqdm.quantizer.evaluate.cli",
    "vqdm.server.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqdm", description=(
        "Compress SDXL / SDXL-Turbo U-Nets to 2-4 bits per weight with additive vector "
        "quantization, and serve them over HTTP."))
    parser.add_argument("--version", action="version", version=f"vqdm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def _quiet_torchvision_fallback(record: logging.LogRecord) -> bool:
    # transformers warns on every diffusers import that CLIP's image processor falls back to PIL
    # without torchvision; vqdm never uses an image processor, so the line only confuses users.
    return "requires torchvision (not installed)" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("transformers.utils.import_utils").addFilter(_quiet_torchvision_fallback)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (VQDMError, ValueError, FileNotFoundError, FileExistsError) as e:
        if args.verbose:
            raise
        print(f"vqdm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vqdm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
