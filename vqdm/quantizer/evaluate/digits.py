"""The digits data and judge: how well the trained digits model (`vqdm.models.digits`) draws.

The model draws scikit-learn's 8×8 handwritten digits (`sklearn.datasets.load_digits`, 1,797
images, no download) upscaled to 32², dark ink on white. It is judged by something this project
did not write: scikit-learn's `LogisticRegression` fitted on the real 8×8 digits. Generated images
are turned back into that space (grey, inverted, box-averaged to 8×8, scaled to 0..16) before they
are classified, and the Fréchet distance between generated and held-out real digits is taken in
the same 64-value space (`feature_frechet_distance`, FID's formula).

scikit-learn is an optional dependency (the `test` extra); serving the model needs none of this.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vqdm.models import Preset
from vqdm.models.digits import DIGITS_PRESET, digit_prompt

try:
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
except ImportError:
    raise ImportError("the digits data and judge need scikit-learn: pip install scikit-learn "
                      "(or pip install -e '.[test]')") from None

JUDGE_TEST_SIZE = 0.3
JUDGE_SPLIT_SEED = 0


@dataclass
class DigitSplit:
    """scikit-learn's digits, 70/30 stratified: x in 0..16, [n, 64] float; y [n] int."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digit_split(test_size: float = JUDGE_TEST_SIZE, seed: int = JUDGE_SPLIT_SEED) -> DigitSplit:
    """The one split everything uses: the generator trains on x_train, the judge is scored on x_test."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return DigitSplit(x_tr.astype(np.float32), y_tr, x_te.astype(np.float32), y_te)


def digits_to_images(x: np.ndarray, size: int = 32) -> torch.Tensor:
    """[n, 64] digits (0..16, ink high) -> [n, 3, size, size] in [-1, 1], dark ink on white.

    Bicubic upscaling draws smooth strokes; box-averaging back to 8×8 (`images_to_digits`) returns
    close to the original values, so a real digit survives the round trip (`round_trip_accuracy`).
    """
    ink = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    ink = F.interpolate(ink, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (1.0 - 2.0 * ink).expand(-1, 3, -1, -1).contiguous()


def images_to_digits(images) -> np.ndarray:
    """PIL images, or uint8 / [0, 1] float arrays [n, H, W, 3], -> [n, 64] in the digits' 0..16 space.

    Grey = mean of RGB; ink = 1 - grey; box average to 8×8 (H and W must be multiples of 8).
    """
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    a = np.asarray(images, dtype=np.float32)
    if a.max() > 1.0 + 1e-6:
        a = a / 255.0
    n, h, w = a.shape[:3]
    if h % 8 or w % 8:
        raise ValueError(f"images are {h}x{w}; the 8×8 judge needs sides that are multiples of 8")
    ink = 1.0 - a[..., :3].mean(axis=-1)
    ink = ink.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
    return (ink * 16.0).reshape(n, 64)


class DigitJudge:
    """scikit-learn's LogisticRegression on the real 8×8 digits' training split."""

    def __init__(self, split: DigitSplit | None = None):
        self.split = split or digit_split()
        self.clf = LogisticRegression(max_iter=5000)
        self.clf.fit(self.split.x_train / 16.0, self.split.y_train)
        self.test_accuracy = float(self.clf.score(self.split.x_test / 16.0, self.split.y_test))

    def predict(self, digits: np.ndarray) -> np.ndarray:
        """[n, 64] in 0..16 -> [n] predicted classes."""
        return self.clf.predict(np.asarray(digits, dtype=np.float64) / 16.0)

    def accuracy(self, images, labels) -> float:
        return float((self.predict(images_to_digits(images)) == np.asarray(labels)).mean())

    def round_trip_accuracy(self) -> float:
        """Held-out real digits upscaled to 32² and back: the judge's ceiling on perfect drawings."""
        imgs = (digits_to_images(self.split.x_test, 32).permute(0, 2, 3, 1).numpy() + 1.0) / 2.0
        return float((self.predict(images_to_digits(imgs)) == self.split.y_test).mean())


def generate_digits(pipe, digits: list[int], seeds: list[int], steps: int | None = None,
                    guidance: float | None = None, template: int = 0, batch_size: int = 20) -> tuple[list, list[int]]:
    """One image per (digit, seed) from `pipe` (dense or VQ), in batches; returns (PIL images, labels)."""
    preset = Preset.from_name(DIGITS_PRESET)
    steps = preset.steps if steps is None else steps
    guidance = preset.guidance if guidance is None else guidance
    pipe.set_progress_bar_config(disable=True)
    jobs = [(d, s) for s in seeds for d in digits]
    images: list = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        gens = [torch.Generator("cpu").manual_seed(s) for _, s in chunk]
        with torch.inference_mode():
            out = pipe([digit_prompt(d, template) for d, _ in chunk], num_inference_steps=steps,
                       guidance_scale=guidance, generator=gens, height=preset.resolution,
                       width=preset.resolution, output_type="pil")
        images.extend(out.images)
    return images, [d for d, _ in jobs]
