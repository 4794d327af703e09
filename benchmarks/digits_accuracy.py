"""How many generated digits scikit-learn's judge recognises, and the folders' bytes on disk: the shipped dense digits model and the
prebuilt K = 2 artifact the server serves by default, measured the same way as train_tiny.py's
`generated_accuracy_0to9_x_seeds01` (digits 0-9 x seeds 0, 1, the preset's steps and guidance).

    python benchmarks/digits_accuracy.py --json benchmarks/results/digits_accuracy.json \
        --png-served benchmarks/results/train_tiny_quantized_default.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import machine  # noqa: E402  (sibling module)
from train_tiny import save_grid  # noqa: E402  (the grid train_tiny.py draws the dense digits with)

from vqdm.models import load_pipeline  # noqa: E402
from vqdm.models.digits import DIGITS_ARTIFACT_DIR, DIGITS_MODEL_DIR  # noqa: E402
from vqdm.quantizer.evaluate.digits import DigitJudge, generate_digits, images_to_digits  # noqa: E402

MODELS = {"dense": DIGITS_MODEL_DIR, "served_default": DIGITS_ARTIFACT_DIR}
DIGITS, SEEDS = list(range(10)), [0, 1]


def score(folder: Path, judge: DigitJudge, png: str | None = None) -> dict:
    images, labels = generate_digits(load_pipeline(folder), DIGITS, SEEDS)
    if png:
        save_grid(images, 10, png, scale=3)
    predicted = judge.predict(images_to_digits(images))
    return {"folder": str(folder.relative_to(Path(__file__).resolve().parents[1])),
            "bytes_on_disk": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
            "accuracy": judge.accuracy(images, labels), "images": len(images),
            "labels": labels, "predicted": [int(p) for p in predicted]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--png-served", help="write the served default's digits (10 per row, one row a seed) here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (train_tiny.py judged with 1)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    judge = DigitJudge()
    result = {"what": "generated digits 0-9 x seeds 0, 1 recognised by the digit judge",
              "command": "python benchmarks/digits_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine("cpu"), "models": {name: score(folder, judge, args.png_served if name == "served_default" else None)
                         for name, folder in MODELS.items()}}
    for name, r in result["models"].items():
        print(f"{name}: {r['accuracy']:.0%} of {r['images']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
