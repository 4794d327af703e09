"""The embedded default: the shipped trained digits model, quantized at start-up with the real
per-layer quantizer, still draws digits that scikit-learn's classifier recognises."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def embedded():
    import time

    import torch

    from vqdm.server.embedded import build_embedded

    # One thread: tiny tensors on a shared 2-core machine; a second thread spin-waits against other
    # processes and made this module ~10x slower (past pytest's timeout) under load.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pipe, extra, preset = build_embedded(seed=0, num_codebooks=2)
    yield pipe, extra, preset, time.perf_counter() - t0
    torch.set_num_threads(saved)


def test_every_selected_layer_is_vq_and_close_to_its_weight(embedded):
    from vqdm.models import load_pipeline, select_layers, vq_modules, weight_matrix
    from vqdm.models.digits import DIGITS_MODEL_DIR, DIGITS_PRESET

    pipe, extra, preset, seconds = embedded
    assert preset.name == DIGITS_PRESET and "trained" in extra["base_model"]["name"]
    layers = dict(vq_modules(pipe.unet))
    dense = dict(select_layers(load_pipeline(DIGITS_MODEL_DIR).unet))  # the shipped trained weights
    assert set(layers) == set(dense) and len(layers) == 180
    assert all(m.num_codebooks == 2 for m in layers.values())
    errs = []
    for name, m in layers.items():
        w = weight_matrix(dense[name]).detach().float()
        errs.append(float((m.dequantize_matrix().float() - w).square().sum() / w.square().sum()))
    assert np.median(errs) < 0.2 and max(errs) < 1.0  # a real fit of the trained weights, not zeros or noise
    assert extra["median_rel_weight_error"] == pytest.approx(np.median(errs), rel=0.05, abs=1e-3)
    assert seconds < 120  # "seconds" on a free 2-core machine; bound generously for a loaded one


def test_serves_through_the_runner(embedded):
    from vqdm.server.jobs import GenerationParams
    from vqdm.server.loader import prepare_replica
    from vqdm.server.runner import Member, run_batch
    from vqdm.server.settings import Settings

    pipe = embedded[0]
    replica = prepare_replica(pipe, "cpu", Settings(devices=["cpu"]))
    p = GenerationParams("vqdm-tiny-sdxl", "x", None, 1, 64, 64, 2, 5.0, "euler", 0)
    (image,) = run_batch(replica, [Member(p)]).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_quantized_default_draws_digits_the_judge_recognises(embedded):
    """Digits 0-9 x 2 seeds from the served (VQ) default, judged by scikit-learn's LogisticRegression
    on the real 8x8 digits: at least 70% must be classified as the digit asked for."""
    from vqdm.quantizer.evaluate.digits import DigitJudge, generate_digits, images_to_digits

    pipe, _, preset, _ = embedded
    images, labels = generate_digits(pipe, list(range(10)), [0, 1])  # the preset's steps and guidance
    assert images[0].size == (preset.resolution, preset.resolution)
    judge = DigitJudge()
    predicted = judge.predict(images_to_digits(images))
    accuracy = float((predicted == np.array(labels)).mean())
    assert accuracy >= 0.7, f"{accuracy:.0%} of generated digits recognised; asked {labels}, judged {predicted.tolist()}"
