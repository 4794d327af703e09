"""PV-tuning's code update: lowers the weight-space objective, respects the trust ratio, keeps the format."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from vqdm.models.vq_layers import VQLinear
from vqdm.quantizer.distill.decoded_weights import DecodedWeights
from vqdm.quantizer.distill.engine import OptimSettings, fit
from vqdm.quantizer.distill.pv_tuning import (PVSettings, PVTuner, candidate_pairs, codes_state, hessian_blocks,
                                              limit_changes, pv_target, reencode, reencode_reference, update_codes)
from vqdm.vq_format import decode


def _format(n=6, d=16, k=2, q=4, g=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, q, (n, d // g, k), generator=gen, dtype=torch.uint8)
    books = torch.randn(k, q, g, generator=gen)
    scales = torch.rand(n, generator=gen) + 0.5
    return codes, books, scales, gen


def _objective(target, codes, books, scales):
    return ((target - decode(codes, books, scales)) ** 2).sum(-1)


def test_fast_reencode_matches_the_exhaustive_reference():
    # beam >= 2^B with K = 2 keeps every first code, so the beam search is exact: same optimum
    codes, books, scales, gen = _format()
    target = torch.randn(6, 16, generator=gen)
    fast, fast_gain = reencode(codes, books, scales, target, beam_size=4, generator=gen)
    ref, ref_gain = reencode_reference(codes, books, scales, target)
    d_fast = ((target - decode(fast, books, scales)) ** 2).reshape(6, 4, 4).sum(-1)
    d_ref = ((target - decode(ref, books, scales)) ** 2).reshape(6, 4, 4).sum(-1)
    torch.testing.assert_close(d_fast, d_ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_gain, ref_gain.float(), rtol=1e-4, atol=1e-5)
    assert (ref_gain > 0).any()


def test_fast_reencode_in_an_h_metric_matches_the_exhaustive_reference():
    codes, books, scales, gen = _format(seed=3)
    x = torch.randn(200, 16, generator=gen) * torch.linspace(0.2, 3, 16)  # uneven, correlated columns
    x[:, 1] += x[:, 0]
    blocks = hessian_blocks(x.T @ x / 200, 4)
    target = torch.randn(6, 16, generator=gen)
    fast, fast_gain = reencode(codes, books, scales, target, beam_size=4, generator=gen, h_blocks=blocks)
    ref, ref_gain = reencode_reference(codes, books, scales, target, h_blocks=blocks)
    torch.testing.assert_close(fast_gain, ref_gain.float(), rtol=1e-4, atol=1e-4)
    assert (ref_gain > 0).any()
    # not the identity-metric answer
    assert not torch.equal(reencode_reference(codes, books, scales, target)[0], ref)


def test_hessian_blocks_are_the_diagonal_blocks_plus_damping():
    h = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    h = h + h.T
    b = hessian_blocks(h, 4, damping=0.0)
    assert b.shape == (2, 4, 4) and torch.equal(b[0], h[:4, :4]) and torch.equal(b[1], h[4:, 4:])
    torch.testing.assert_close(hessian_blocks(h, 4, 0.5)[1] - b[1], 0.5 * h.diagonal().mean() * torch.eye(4))


def test_reencode_never_raises_the_distance_and_reports_exact_gains():
    codes, books, scales, gen = _format(n=32, d=64, k=3, q=16, g=8, seed=1)
    target = decode(codes, books, scales) + 0.5 * torch.randn(32, 64, generator=gen)
    new, gain = reencode(codes, books, scales, target, beam_size=2, generator=gen)
    old_d = ((target - decode(codes, books, scales)) ** 2).reshape(32, 8, 8).sum(-1)
    new_d = ((target - decode(new, books, scales)) ** 2).reshape(32, 8, 8).sum(-1)
    assert (new_d <= old_d + 1e-5).all() and (gain >= 0).all()
    torch.testing.assert_close(old_d - new_d, gain, rtol=1e-4, atol=1e-4)
    assert new.dtype == torch.uint8 and ((new != codes).any(-1) == (gain > 0)).all()  # codes change exactly where they gain


def test_candidates_restrict_the_search_and_are_the_farthest_moved_pairs():
    codes, books, scales, gen = _format(n=8, d=16, seed=4)
    disp = torch.zeros(8, 16)
    disp[2, 4:8] = 5.0  # pair (2, 1) moved most, then (5, 3)
    disp[5, 12:16] = 1.0
    cand = candidate_pairs(disp, None, 4, fraction=2 / 32)
    assert cand.sum() == 2 and cand[2, 1] and cand[5, 3]
    target = decode(codes, books, scales) + torch.randn(8, 16, generator=gen)
    new, gain = reencode(codes, books, scales, target, beam_size=4, generator=gen, candidates=cand)
    full, full_gain = reencode(codes, books, scales, target, beam_size=4, generator=gen)
    assert torch.equal(new[~cand], codes[~cand]) and (gain[~cand] == 0).all()
    torch.testing.assert_close(gain[cand], full_gain[cand])


def test_trust_ratio_keeps_the_largest_gains_only():
    old = torch.zeros(4, 5, 2, dtype=torch.uint8)
    new = torch.ones(4, 5, 2, dtype=torch.uint8)
    gain = torch.arange(20, dtype=torch.float32).reshape(4, 5)  # one zero gain: never a change
    kept = limit_changes(old, new, gain, trust_ratio=0.2)
    changed = (kept != 0).any(-1)
    assert changed.sum() == 4 and changed.reshape(-1)[-4:].all()
    assert (limit_changes(old, new, gain, 1.0) != 0).any(-1).sum() == 19


def test_update_codes_lowers_the_objective_respects_the_trust_ratio_and_keeps_the_format():
    torch.manual_seed(0)
    layer = VQLinear(64, 48, num_codebooks=2, group_size=8)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (48, 8, 2), generator=gen, dtype=torch.uint8)
    layer.set_quantized(codes, 0.1 * torch.randn(2, 256, 8, generator=gen), torch.rand(48, generator=gen) + 0.5)
    books, scales = layer.codebooks.detach().clone(), layer.scales.detach().clone()
    grad = torch.randn(48, 64, generator=gen)
    w_hat = decode(layer.codes, books, scales)
    target = pv_target(w_hat, grad, 0.5, normalize=True)
    before = float(((target - w_hat) ** 2).sum())
    settings = PVSettings(every=1, step_size=0.5, trust_ratio=0.05, beam_size=4, direction="gradient", candidates=20)
    stats = update_codes(layer, grad, settings, gen)
    after = float(((target - decode(layer.codes, books, scales)) ** 2).sum())
    assert stats["objective_before"] == pytest.approx(before, rel=1e-5)
    assert stats["objective_after"] == pytest.approx(after, rel=1e-5) and after < before
    changed = (layer.codes != codes).any(-1)
    assert 0 < changed.float().mean() <= 0.05 and stats["changed"] == pytest.approx(float(changed.float().mean()))
    assert layer.codes.dtype == torch.uint8 and layer.codes.shape == (48, 8, 2)
    assert torch.equal(layer.codebooks.detach(), books) and torch.equal(layer.scales.detach(), scales)
    # the step is along −G: the new decode moved against the gradient
    assert float(((decode(layer.codes, books, scales) - w_hat) * grad).sum()) < 0


def test_pv_settings_reject_bad_values():
    for bad in ({"every": 0}, {"every": 1, "trust_ratio": 0}, {"every": 1, "trust_ratio": 1.5},
                {"every": 1, "step_size": 0}, {"every": 1, "beam_size": 0}, {"every": 1, "direction": "sgd"},
                {"every": 1, "candidates": 0.5}):
        with pytest.raises(ValueError):
            PVSettings(**bad)


def test_tuner_adam_direction_is_bias_corrected_and_bounded():
    layer = VQLinear(16, 4, num_codebooks=1, group_size=8)
    tuner = PVTuner({"l": layer}, PVSettings(every=3))
    g = torch.randn(4, 16)
    tuner.accumulate({"l": g})
    torch.testing.assert_close(tuner.direction("l"), g / (g.abs() + 1e-12))  # one gradient: its sign
    tuner.accumulate({"l": -g})
    assert tuner.direction("l").abs().max() <= 1.0 + 1e-6


def test_tuner_updates_every_n_steps_until_its_last_step():
    layer = VQLinear(16, 4, num_codebooks=1, group_size=8)
    layer.set_quantized(torch.randint(0, 256, (4, 2, 1), dtype=torch.uint8), torch.randn(1, 256, 8), torch.ones(4))
    tuner = PVTuner({"l": layer}, PVSettings(every=2, until=5))
    done = []
    for _ in range(8):
        tuner.accumulate({"l": torch.randn(4, 16)})
        done.append(tuner.step() is not None)
    assert done == [False, True, False, True, False, False, False, False]


def test_fit_with_pv_tuning_changes_codes_and_keeps_them_with_the_best_student():
    # a VQ student fitted to a dense teacher layer: PV moves codes, the best student's codes are restored
    torch.manual_seed(0)
    teacher = nn.Linear(32, 16)
    student = VQLinear(32, 16, num_codebooks=1, group_size=8)
    gen = torch.Generator().manual_seed(1)
    student.set_quantized(torch.randint(0, 256, (16, 4, 1), generator=gen, dtype=torch.uint8),
                          0.2 * torch.randn(1, 256, 8, generator=gen), torch.ones(16))
    with torch.no_grad():
        student.bias.copy_(teacher.bias)
    model = nn.Sequential(student)
    codes0 = student.codes.clone()
    xs = [torch.randn(64, 32, generator=gen) for _ in range(8)]
    x_val = torch.randn(256, 32, generator=gen)
    decoded = DecodedWeights(model)
    x_cal = torch.randn(512, 32, generator=gen)
    tuner = PVTuner(decoded.named, PVSettings(every=2, step_size=0.5, trust_ratio=0.2, beam_size=4, candidates=5), seed=0,
                    hessians={"0": x_cal.T @ x_cal / 512})
    params = {"0.codebooks": student.codebooks, "0.scales": student.scales}
    for p in params.values():
        p.requires_grad_(True)

    def loss_fn(i):
        return ((model(xs[i % 8]) - teacher(xs[i % 8]).detach()) ** 2).mean()

    def validate():
        with torch.no_grad():
            return float(((model(x_val) - teacher(x_val)) ** 2).mean())

    def after_backward():
        tuner.accumulate(decoded.grads())
        decoded.push_gradients()

    def after_step():
        tuner.step()
        decoded.refresh()

    with decoded.installed():
        res = fit(params, loss_fn, iter(range(1000)), validate, 20, OptimSettings(1e-3, 1e-3, 1e-3), eval_every=5,
                  patience=10, after_step=after_step, after_backward=after_backward,
                  kept_with_best=codes_state(model))
        best_codes = res.selection.best_state["0.codes"]
        assert torch.equal(student.codes, best_codes.to(student.codes.dtype))
        assert validate() == pytest.approx(res.selection.best_error, rel=1e-5)
    assert len(tuner.history) == 10 and not torch.equal(student.codes, codes0)
    assert res.selection.improved
