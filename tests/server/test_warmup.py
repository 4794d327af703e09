"""Warm-up runs the configured worst case (max_batch_size images at the largest size the limits
admit) when asked, through the real runner, before /readyz turns 200."""
from __future__ import annotations

import logging


def test_worst_case_warm_up(make_client, caplog):
    with caplog.at_level(logging.INFO, logger="vqdm.server"):
        c = make_client(warmup_size="max", max_batch_size=3, max_side=192, max_pixels=160 * 160)
    assert c.get("/readyz").status_code == 200
    warmed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warmed up")]
    # isqrt(160²) = 160 < max_side 192: the largest square the limits admit, 3 images, each model.
    assert any(m.startswith("warmed up tiny on cpu with 3 x 160x160") for m in warmed), warmed
    assert any(m.startswith("warmed up turbo on cpu with 3 x 160x160") for m in warmed), warmed


def test_cpu_auto_warm_up_is_one_image_at_the_model_size(make_client, caplog):
    with caplog.at_level(logging.INFO, logger="vqdm.server"):
        make_client(max_batch_size=3)
    warmed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warmed up tiny")]
    assert warmed and warmed[-1].startswith("warmed up tiny on cpu with 1 x 128x128")
