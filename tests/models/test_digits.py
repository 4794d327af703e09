"""The shipped trained digits model, its cut-down tokenizer, and the scikit-learn judge."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vqdm.models import Preset, load_pipeline
from vqdm.models.digits import (DIGITS_MODEL_DIR, DIGITS_PRESET, DigitJudge, digit_prompt, digit_split,
                                digits_to_images, frechet_distance, images_to_digits)

MAX_BYTES = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def judge():
    return DigitJudge()


def test_shipped_folder_is_small_fp16_and_matches_its_preset():
    files = [f for f in DIGITS_MODEL_DIR.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    assert 0 < size <= MAX_BYTES, f"{size / 1e6:.2f} MB"
    preset = Preset.from_name(DIGITS_PRESET)
    cfg = json.loads((DIGITS_MODEL_DIR / "unet" / "config.json").read_text())
    for key in ("block_out_channels", "cross_attention_dim", "sample_size", "down_block_types"):
        assert cfg[key] == preset.unet[key], key
    pipe = load_pipeline(DIGITS_MODEL_DIR, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in pipe.unet.parameters())
    assert pipe.vae.config.latents_mean is not None  # trained statistics, not the random preset's
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == preset.resolution == 32


def test_cut_down_bpe_tokenizes_any_text_without_unknowns():
    pipe = load_pipeline(DIGITS_MODEL_DIR)
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        assert len(tok) == enc.config.vocab_size == Preset.from_name(DIGITS_PRESET).text_encoder["vocab_size"]
        ids = tok("a handwritten digit 7, Überraschung! 🙂").input_ids
        assert max(ids) < len(tok) and tok.unk_token_id not in ids[1:-1]
        assert ids[0] == enc.config.bos_token_id and ids[-1] == enc.config.eos_token_id


def test_judge_is_accurate_on_real_digits_and_their_round_trip(judge):
    assert judge.test_accuracy > 0.93  # sklearn's LogisticRegression on the 30% held out
    assert judge.round_trip_accuracy() > 0.9  # upscaled to 64² and box-averaged back


def test_images_to_digits_inverts_digits_to_images():
    x = digit_split().x_test[:50]
    back = images_to_digits((digits_to_images(x).permute(0, 2, 3, 1).numpy() + 1) / 2)
    assert back.shape == (50, 64)
    assert np.abs(back - x).mean() < 1.0 < np.abs(back - x[::-1]).mean()  # 0..16 scale
    blank = images_to_digits(np.full((2, 64, 64, 3), 255, np.uint8))
    assert np.allclose(blank, 0)  # white paper, no ink


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 8))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, a + 2.0) == pytest.approx(8 * 4.0, rel=1e-6)  # mean shift only
    assert frechet_distance(a, 3 * a) == pytest.approx(8 * (1 - 3) ** 2, rel=0.05)  # σ 1 vs 3: (σa - σb)² per dim
    split = digit_split()
    assert frechet_distance(split.x_train, split.x_test) < frechet_distance(split.x_train, split.x_test[:, ::-1])


def test_digit_prompts():
    assert digit_prompt(3) == "a handwritten digit 3"
    assert digit_prompt(7, 1) == "the number seven, handwritten"
