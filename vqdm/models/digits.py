"""The trained digits model shipped with vqdm: its folder, preset name and training prompts.

The model (`DIGITS_MODEL_DIR`, written by `benchmarks/train_tiny.py`) draws scikit-learn's 8×8
handwritten digits upscaled to 32², dark ink on white. Its data and the scikit-learn judge that
scores it are in `vqdm.quantizer.evaluate.digits`: serving the model needs none of that.
"""
from __future__ import annotations

from pathlib import Path

DIGITS_PRESET = "tiny-sdxl-digits"
DIGITS_MODEL_DIR = Path(__file__).resolve().parent / "pretrained" / DIGITS_PRESET
# The server's embedded default: the model above quantized (K = 2) by benchmarks/make_embedded_artifact.py.
DIGITS_ARTIFACT_DIR = DIGITS_MODEL_DIR.parent / f"{DIGITS_PRESET}-vq2"

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Phrasings the U-Net is trained on; {d} is the numeral, {w} the word. Only a few: the frozen
# random text encoders carry the digit weakly, and with six phrasings their pooled embeddings were
# not even linearly separable by digit (a first run learned no conditioning in 1,000 steps).
PROMPT_TEMPLATES = (
    "a handwritten digit {d}",
    "the number {w}, handwritten",
    "handwritten {d}",
)


def digit_prompt(digit: int, template: int = 0) -> str:
    return PROMPT_TEMPLATES[template].format(d=digit, w=DIGIT_WORDS[digit])


def training_prompts() -> list[str]:
    """Every phrasing of every digit the model is trained on, digits 0-9 within each template in turn."""
    return [digit_prompt(d, t) for t in range(len(PROMPT_TEMPLATES)) for d in range(len(DIGIT_WORDS))]
