"""quantize_weight (AQ of one layer), AQConfig validation, and the relative-error measure."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from vqdm.errors import ConfigError
from vqdm.quantizer import (AQConfig, AQConfigError, layer_loss, quantize_weight, rel_err,
                            relative_error, rtn_quantize, scalar_bits_per_weight)
from vqdm.vq_format import decode_groups

# Cheap search settings: the properties tested do not depend on the SPEC's 100 Adam steps.
FAST = dict(adam_steps=30, max_rounds=2, kmeans_iters=20)


pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_layer(n=256, d=256, seed=0):
    """Heavy-tailed weights (like trained layers) and H from correlated, unevenly scaled inputs."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + 1.2 * torch.randn(d, d, generator=gen) / d**0.5
    x = torch.randn(4000, d, generator=gen) @ mix * torch.linspace(0.3, 3.0, d)
    h = (x.T @ x / 4000).double()
    torch.manual_seed(seed)
    w = torch.distributions.StudentT(4.0).sample((n, d)) * 0.05
    return w, h


@pytest.fixture(scope="module")
def layer():
    return correlated_layer()


def test_output_format_and_stats(layer):
    w, h = layer
    qw = quantize_weight(w, h, AQConfig(num_codebooks=3, **FAST))
    assert qw.codes.shape == (256, 32, 3) and qw.codes.dtype == torch.uint8
    assert qw.codebooks.shape == (3, 256, 8) and qw.codebooks.dtype == torch.float32
    assert qw.scales.shape == (256,) and qw.scales.dtype == torch.float32
    w_hat = qw.dequantize()
    assert w_hat.shape == (256, 256) and w_hat.dtype == torch.float32
    # the reported error is the error of what is stored, recomputed independently
    assert qw.rel_error == pytest.approx(relative_error(w, w_hat, h), rel=1e-5)
    assert qw.stats["loss"] == pytest.approx(layer_loss(w, w_hat, h), rel=1e-5)
    assert qw.stats["base_loss"] == pytest.approx(layer_loss(w, torch.zeros_like(w), h), rel=1e-9)
    assert qw.bits_per_weight == pytest.approx(3 + 3 * 256 * 8 * 16 / (256 * 256) + 16 / 256)
    assert 1 <= qw.rounds <= 2 and qw.seconds > 0
    assert set(qw.stats["seconds_by_phase"]) == {"kmeans", "cholesky", "pass_fit", "pass_search", "lsq", "adam", "beam",
                                                 "loss"}
    assert len(qw.stats["pass_losses"]) == AQConfig().init_passes


def test_each_round_decreases_the_loss(layer):
    w, h = layer
    # from the k-means start (no sequential passes), where rounds have the most to gain
    qw = quantize_weight(w, h, AQConfig(num_codebooks=2, adam_steps=30, max_rounds=4, relative_tolerance=0.0, init_passes=0))
    hist = qw.stats["history"]
    assert len(hist) == 4
    prev = qw.stats["objective_init_loss"]  # the search's own objective (on the damped H)
    for r in hist:
        assert r["loss_after_adam"] <= prev  # Adam keeps its best iterate
        assert r["loss_after_beam"] <= r["loss_after_adam"]  # beam search never increases the loss
        assert r["loss_after_beam"] < prev  # and the round as a whole gains
        prev = r["loss_after_beam"]
    assert hist[-1]["loss_after_beam"] < 0.8 * qw.stats["objective_init_loss"]


def test_stops_when_a_round_gains_less_than_the_tolerance(layer):
    w, h = layer
    qw = quantize_weight(w, h, AQConfig(num_codebooks=2, adam_steps=10, max_rounds=50, relative_tolerance=0.05, init_passes=0))
    hist = qw.stats["history"]
    assert len(hist) < 50
    losses = [qw.stats["objective_init_loss"]] + [r["loss_after_beam"] for r in hist]
    gains = [(a - b) / a for a, b in zip(losses, losses[1:])]
    assert gains[-1] < 0.05 and all(gn >= 0.05 for gn in gains[:-1])


def test_aq_beats_rtn_with_fewer_bits(layer):
    w, h = layer
    qw = quantize_weight(w, h, AQConfig(num_codebooks=2, **FAST))  # 2 + 1 (codebooks) + 0.06 = 3.06 bits here
    rtn = relative_error(w, rtn_quantize(w, bits=3, group_size=128), h)  # 3.25 bits
    assert qw.bits_per_weight < scalar_bits_per_weight(3, 128)
    assert qw.rel_error < 0.6 * rtn


def test_more_codebooks_lower_error(layer):
    w, h = layer
    errs = [quantize_weight(w, h, AQConfig(num_codebooks=k, **FAST)).rel_error for k in (1, 2, 3)]
    assert errs[0] > 2 * errs[1] > 4 * errs[2]


def test_greedy_search_works(layer):
    w, h = layer
    qw = quantize_weight(w, h, AQConfig(num_codebooks=2, beam_size=1, init_passes=0, **FAST))
    assert qw.rel_error < 0.8 * qw.stats["init_rel_error"]
    greedy_passes = quantize_weight(w, h, AQConfig(num_codebooks=2, beam_size=1, **FAST))  # a beam of 1 in the passes too
    assert greedy_passes.rel_error < qw.rel_error


def test_same_seed_same_result_other_seed_differs():
    w, h = correlated_layer(n=64, d=64)  # five runs: determinism does not depend on the layer's size
    cfg = AQConfig(num_codebooks=2, seed=7, **FAST)
    a, b = quantize_weight(w, h, cfg), quantize_weight(w, h, cfg)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks) and torch.equal(a.scales, b.scales)
    c = quantize_weight(w, h, dataclasses.replace(cfg, seed=8))
    assert not torch.equal(a.codes, c.codes)
    # seed=None draws from torch's global RNG: reproducible under torch.manual_seed
    torch.manual_seed(3)
    d1 = quantize_weight(w, h, dataclasses.replace(cfg, seed=None))
    torch.manual_seed(3)
    d2 = quantize_weight(w, h, dataclasses.replace(cfg, seed=None))
    assert torch.equal(d1.codes, d2.codes)


def test_zero_rows_dead_inputs_and_float32_h():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(64, 64, generator=gen)
    w[3] = 0.0
    x = torch.randn(500, 64, generator=gen)
    x[:, :8] = 0.0  # the first group of inputs is never active: H has zero rows/columns there
    h = x.T @ x / 500  # float32 H is accepted too
    qw = quantize_weight(w, h, AQConfig(num_codebooks=2, **FAST))
    w_hat = qw.dequantize()
    assert torch.isfinite(w_hat).all()
    assert float(w_hat[3].abs().max()) == 0.0
    assert 0 < qw.rel_error < 1


@pytest.mark.parametrize("field,value", [
    ("num_codebooks", 0), ("num_codebooks", 2.5), ("nbits", 4), ("nbits", 16), ("group_size", 0),
    ("beam_size", 0), ("adam_steps", -1), ("lr", 0.0), ("lr", float("nan")), ("betas", (0.9,)),
    ("betas", (0.0, 1.0)), ("kmeans_iters", 101), ("relative_tolerance", -0.1), ("max_rounds", -1),
    ("seed", "x"), ("device", "gpu-please"), ("init_passes", -1), ("init_passes", 1.5), ("init_cg_iters", -2),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(AQConfigError) as info:
        AQConfig(**{field: value})
    assert f"AQConfig.{field}=" in str(info.value) and "not supported" in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ConfigError)


def test_input_validation():
    w, h = torch.randn(64, 60), torch.eye(60)
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(w, h, AQConfig(group_size=8))
    with pytest.raises(ValueError, match=r"H must be \[d, d\]"):
        quantize_weight(torch.randn(64, 64), torch.eye(32))
    with pytest.raises(ValueError, match="fewer than the 256 codewords"):
        quantize_weight(torch.randn(8, 64), torch.eye(64))
    bad = torch.randn(64, 64)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_weight(bad, torch.eye(64))


def test_relative_error_equals_output_error_on_the_samples():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(300, 48, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 4, 48, dtype=torch.float64)
    w = torch.randn(20, 48, generator=gen, dtype=torch.float64)
    w_hat = w + 0.1 * torch.randn(20, 48, generator=gen, dtype=torch.float64)
    h = x.T @ x / 300
    direct = float((x @ (w_hat - w).T).square().sum() / (x @ w.T).square().sum())
    assert relative_error(w, w_hat, h) == pytest.approx(direct, rel=1e-10)
    assert rel_err(w, w_hat, h) == relative_error(w, w_hat, h)
    assert relative_error(w, w, h) == 0.0
    assert relative_error(w, torch.zeros_like(w), h) == pytest.approx(1.0)
    assert layer_loss(w, w_hat, h) == pytest.approx(float((x @ (w_hat - w).T).square().sum()) / 300 / 20, rel=1e-10)


def test_decode_matches_reference_format(layer):
    w, h = layer
    qw = quantize_weight(w, h, AQConfig(num_codebooks=2, adam_steps=5, max_rounds=1, kmeans_iters=5))
    mine = decode_groups(qw.codes, qw.codebooks).reshape(256, 256) * qw.scales[:, None]
    torch.testing.assert_close(mine, qw.dequantize())


def test_damping_reports_errors_on_the_undamped_h(layer):
    """The search runs on H + λ·mean(diag H)·I; rel_error is still measured on the caller's H."""
    w, h = layer
    damped = quantize_weight(w, h, AQConfig(num_codebooks=2, damping=0.5, **FAST))
    plain = quantize_weight(w, h, AQConfig(num_codebooks=2, damping=0.0, **FAST))
    assert damped.rel_error == pytest.approx(relative_error(w, damped.dequantize(), h), rel=1e-4)
    assert plain.rel_error == pytest.approx(relative_error(w, plain.dequantize(), h), rel=1e-4)
    h_damped = h + 0.5 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    objective = damped.stats["objective_loss"] / damped.stats["objective_base_loss"]
    assert objective == pytest.approx(relative_error(w, damped.dequantize(), h_damped), rel=1e-4)
    assert plain.stats["objective_loss"] == plain.stats["loss"]  # no damping: one objective
    assert not torch.equal(damped.codes, plain.codes)  # the damping changed what the search found


def test_damping_lowers_the_error_on_held_out_inputs():
    """Few calibration rows for d = 128: damping generalises better to fresh inputs from the same source."""
    gen = torch.Generator().manual_seed(3)
    d, n = 128, 128
    mix = torch.eye(d) + 1.5 * torch.randn(d, d, generator=gen) / d**0.5
    scale = torch.linspace(0.3, 3.0, d)
    x_cal = torch.randn(192, d, generator=gen) @ mix * scale
    x_out = torch.randn(20000, d, generator=gen) @ mix * scale
    h_cal, h_out = (x_cal.T @ x_cal / 192).double(), (x_out.T @ x_out / 20000).double()
    w = torch.randn(n, d, generator=gen) * 0.05
    held = {lam: relative_error(w, quantize_weight(w, h_cal, AQConfig(num_codebooks=1, damping=lam, **FAST)).dequantize(),
                                h_out) for lam in (0.0, 0.2)}
    assert held[0.2] < held[0.0]


def test_damping_must_be_a_non_negative_number():
    for bad in (-0.1, float("nan"), True, "0.2"):
        with pytest.raises(AQConfigError, match="damping"):
            AQConfig(damping=bad)


def test_sequential_passes_start_lower_and_end_lower(layer):
    """The passes after k-means: a far better start, and a lower error after the same rounds."""
    w, h = layer
    cheap = dict(max_rounds=2, relative_tolerance=0.0, kmeans_iters=20)
    plain = quantize_weight(w, h, AQConfig(num_codebooks=2, init_passes=0, **cheap))
    passes = quantize_weight(w, h, AQConfig(num_codebooks=2, init_passes=4, **cheap))
    assert passes.stats["init_rel_error"] < 0.9 * plain.stats["init_rel_error"]
    assert passes.rel_error < plain.rel_error
    assert plain.stats["pass_losses"] == [] and len(passes.stats["pass_losses"]) == 4
    # the passes' time is booked to their own phases
    assert passes.stats["seconds_by_phase"]["pass_search"] > 0 and plain.stats["seconds_by_phase"]["pass_fit"] == 0
