"""The embedded default: tiny SDXL quantized at start-up with the real per-layer quantizer."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def embedded():
    import time

    from vqdm.server.embedded import build_embedded

    t0 = time.perf_counter()
    pipe, extra, preset = build_embedded(seed=0, num_codebooks=2)
    return pipe, extra, preset, time.perf_counter() - t0


def test_every_selected_layer_is_vq_and_close_to_its_weight(embedded):
    from vqdm.models import build_pipeline, select_layers, vq_modules, weight_matrix

    pipe, extra, preset, seconds = embedded
    layers = dict(vq_modules(pipe.unet))
    dense = dict(select_layers(build_pipeline("tiny-sdxl", seed=0).unet))
    assert set(layers) == set(dense) and len(layers) == 180
    assert all(m.num_codebooks == 2 for m in layers.values())
    errs = []
    for name, m in layers.items():
        w = weight_matrix(dense[name]).detach().float()
        errs.append(float((m.dequantize_matrix().float() - w).square().sum() / w.square().sum()))
    assert np.median(errs) < 0.5 and max(errs) < 1.0  # a real fit, not zeros or noise
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
