"""Distillation presets: learning rates by family and model scale; small runs get fewer rounds."""
from __future__ import annotations

import dataclasses

import pytest

from vqdm.errors import ConfigError
from vqdm.quantizer.distill.config import MIN_TRAJECTORIES_PER_ROUND
from vqdm.quantizer.distill.run import eval_batches, round_batches
from vqdm.quantizer.distill.recipes import DISTILL_LRS, detect_recipe, model_scale, recipe


def test_scale_follows_the_unet_width_and_sets_the_learning_rates(tiny_sdxl_dir, tiny_turbo_dir):
    assert model_scale({"block_out_channels": [320, 640, 1280]}) == "full"
    assert model_scale({"block_out_channels": [32, 64, 64]}) == "tiny"
    tiny, turbo = detect_recipe(tiny_sdxl_dir), detect_recipe(tiny_turbo_dir)
    assert {k: getattr(tiny, k) for k in DISTILL_LRS["tiny"]} == DISTILL_LRS["tiny"]
    assert tiny.lr_reference_error == 0.2  # K = 2's error; closer students get smaller rates
    assert tiny.lr_min_scale == 0.25 and recipe("sdxl").lr_min_scale == 1e-3
    assert turbo.teacher.scheduler == "native" and turbo.lr_codebooks == DISTILL_LRS["tiny"]["lr_codebooks"]
    full = recipe("sdxl")
    assert full.lr == 1e-6 and full.lr_codebooks == DISTILL_LRS["full"]["lr_codebooks"]
    assert full.lr_reference_error is None  # not measured at full scale: the rates as given
    assert full.val_prompts == 16 and full.test_prompts == 16
    with pytest.raises(ConfigError, match="model scale"):
        recipe("sdxl", "huge")


def test_small_runs_keep_at_least_eight_prompts_a_round():
    d = recipe("sdxl")
    assert d.fit_rounds().rounds == 4  # the SPEC run: 2,048 prompts in 4 rounds
    assert d.replace(num_prompts=8).fit_rounds().rounds == 1
    assert d.replace(num_prompts=20).fit_rounds().rounds == 2
    turbo = recipe("sdxl-turbo")  # 8 prompts a teacher batch: one batch, one round
    assert turbo.fit_rounds(8).rounds == 1 and turbo.fit_rounds(8).teacher.num_prompts == 8
    with pytest.raises(ConfigError, match="--val-prompts"):
        d.replace(val_prompts=0)


def test_acceptance_and_error_scaling_settings():
    d = recipe("sdxl", "tiny")
    assert d.min_improvement == 0.02
    assert d.replace(flat_lr=True).lr_reference_error is None
    assert d.replace(flat_lr=None).lr_reference_error == 0.2
    assert d.replace(min_improvement=0.0).min_improvement == 0.0
    with pytest.raises(ConfigError, match="--min-improvement"):
        d.replace(min_improvement=1.0)
    with pytest.raises(ConfigError, match="--lr-reference-error"):
        d.replace(lr_reference_error=-0.1)


def test_small_runs_draw_several_seeds_per_prompt_and_the_spec_runs_one():
    d = recipe("sdxl")
    assert d.trajectories_per_prompt == 1 and d.num_trajectories == 2048  # 512 prompts a round
    assert recipe("sdxl-turbo").trajectories_per_prompt == 1
    small = d.fit_rounds(8)  # 1 round of 8 prompts -> 4 seeds each
    assert small.trajectories_per_prompt == MIN_TRAJECTORIES_PER_ROUND // 8
    assert d.fit_rounds(32).trajectories_per_prompt == 4  # 4 rounds of 8
    assert d.fit_rounds(128).trajectories_per_prompt == 1
    assert small.replace(seeds_per_prompt=1).num_trajectories == 8
    assert small.sampling().num_prompts == small.num_trajectories
    with pytest.raises(ConfigError, match="--seeds-per-prompt"):
        d.replace(seeds_per_prompt=0)


def test_training_trajectories_share_text_not_seeds_with_each_other_or_the_held_out_sets():
    cfg = recipe("sdxl").fit_rounds(8, 2)  # 4 seeds per prompt
    prompts = [f"prompt {i}" for i in range(40)]
    train = [b for r in round_batches(cfg, prompts) for b in r]
    texts = [t for b in train for t in b.prompts]
    assert texts == [f"prompt {j // 4}" for j in range(32)]
    train_seeds = {s for b in train for s in b.seeds}
    assert len(train_seeds) == 32
    held_out = eval_batches(cfg, prompts, "val") + eval_batches(cfg, prompts, "test")
    held_texts = {t for b in held_out for t in b.prompts}
    held_seeds = {s for b in held_out for s in b.seeds}
    assert held_texts.isdisjoint(texts) and held_seeds.isdisjoint(train_seeds)
    assert len(held_seeds) == cfg.val_prompts + cfg.test_prompts


def test_flat_names_reach_the_teacher_sampling_and_the_manifest_keys_keep_their_order():
    from vqdm.quantizer.distill.config import FLAT_ORDER, TEACHER_FIELDS, DistillConfig

    d = recipe("sdxl").replace(num_prompts=24, gen_batch_size=3, steps=7, seed=5, prompts_file="p.txt")
    t = d.teacher
    assert (t.num_prompts, t.batch_size, t.steps, t.seed, t.prompts_file) == (24, 3, 7, 5, "p.txt")
    flat = d.to_dict()
    assert tuple(flat) == FLAT_ORDER  # manifests and resume identities are compared key by key
    own = {f.name for f in dataclasses.fields(DistillConfig)} - {"teacher"}
    assert set(flat) == own | set(TEACHER_FIELDS)
    assert flat["gen_batch_size"] == 3 and flat["batch_size"] == d.batch_size == 4  # teacher calls vs training
    assert d.sampling().num_prompts == d.num_trajectories and d.sampling().batch_size == 3
