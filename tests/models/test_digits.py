"""The shipped trained digits model and its cut-down tokenizer (its judge: tests/quantizer/evaluate/test_digits.py)."""
from __future__ import annotations

import json

import torch

from vqdm.models import Preset, load_pipeline
from vqdm.models.digits import DIGITS_MODEL_DIR, DIGITS_PRESET, digit_prompt

MAX_BYTES = 10 * 1024 * 1024


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


def test_digit_prompts():
    assert digit_prompt(3) == "a handwritten digit 3"
    assert digit_prompt(7, 1) == "the number seven, handwritten"
