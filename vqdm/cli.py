"""`vqdm` command line. Each area registers its subcommands; library code raises, this turns
errors into one-line messages and exit codes."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from vqdm import __version__
from vqdm.errors import VQDMError

# The module that registers each subcommand (`register(subparsers)`; each subcommand sets
# `func(args) -> int`). `vqdm serve` builds only the server's parser, so the serving process never
# imports vqdm.quantizer (tests/server/test_embedded.py checks it); help lists them all, in this order.
COMMANDS = {"make-model": "vqdm.models.cli", "plan": "vqdm.models.cli", "inspect": "vqdm.models.cli",
            "export": "vqdm.models.cli",
            "quantize": "vqdm.quantizer.quantize.cli", "distill": "vqdm.quantizer.distill.cli",
            "eval": "vqdm.quantizer.evaluate.cli", "serve": "vqdm.server.cli", "generate": "vqdm.server.cli"}
# Modules that add to another area's subcommand (`extend(parser)`): `vqdm plan --time` needs the
# quantizer, which vqdm.models (the plan's home) may not import.
EXTENSIONS = {"plan": "vqdm.quantizer.quantize.plan_cli"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with `command` (a known subcommand) only the module that registers it."""
    parser = argparse.ArgumentParser(prog="vqdm", description=(
        "Compress SDXL / SDXL-Turbo U-Nets to 2-4 bits per weight with additive vector "
        "quantization, and serve them over HTTP."))
    parser.add_argument("--version", action="version", version=f"vqdm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values()):
        importlib.import_module(mod).register(sub)
    for name, mod in EXTENSIONS.items():
        if name in sub.choices:
            importlib.import_module(mod).extend(sub.choices[name])
    return parser


def _quiet_torchvision_fallback(record: logging.LogRecord) -> bool:
    # transformers warns on every diffusers import that CLIP's image processor falls back to PIL
    # without torchvision; vqdm never uses an image processor, so the line only confuses users.
    return "requires torchvision (not installed)" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("transformers.utils.import_utils").addFilter(_quiet_torchvision_fallback)
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))  # the subcommand, if any
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
