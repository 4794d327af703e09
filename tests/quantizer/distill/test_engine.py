"""The architecture-free distillation engine: groups, schedule, clipping, selection, `fit` on a toy student."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from vqdm.quantizer.distill.engine import (OptimSettings, Selection, error_lr_scale, fit, group_of, lr_factor,
                                          make_optimizer, scale_learning_rates)


def test_groups_and_their_learning_rates():
    assert [group_of(n) for n in ("a.b.codebooks", "x.scales", "conv_in.weight", "scales_net.bias")] == [
        "codebooks", "scales", "other", "other"]
    params = {"l.codebooks": nn.Parameter(torch.zeros(2)), "l.scales": nn.Parameter(torch.zeros(2)),
              "l.bias": nn.Parameter(torch.zeros(2))}
    opt = make_optimizer(params, OptimSettings(lr=1e-3, lr_codebooks=2e-3, lr_scales=3e-3))
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"codebooks": 2e-3, "scales": 3e-3, "other": 1e-3}


def test_warmup_then_cosine_to_the_floor():
    opt = OptimSettings(lr=1, lr_codebooks=1, lr_scales=1, warmup=0.1, min_lr_factor=0.1)
    f = [lr_factor(s, 100, opt) for s in range(100)]
    assert f[0] == pytest.approx(1 / 11) and all(a < b for a, b in zip(f[:10], f[1:11]))  # linear ramp
    assert f[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(f[10:], f[11:]))  # then decays
    assert f[-1] == pytest.approx(0.1, abs=0.01)
    assert lr_factor(0, 100, OptimSettings(lr=1, lr_codebooks=1, lr_scales=1, warmup=0)) == pytest.approx(1.0)


def test_selection_keeps_the_best_and_stops_after_patience():
    p = {"w": nn.Parameter(torch.tensor([0.0]))}
    sel = Selection(before=1.0, patience=2)
    for step, (value, err) in enumerate([(1.0, 0.9), (2.0, 0.5), (3.0, 0.6)], 1):
        p["w"].data.fill_(value)
        assert not sel.update(step, err, p)
    p["w"].data.fill_(4.0)
    assert sel.update(4, 0.7, p)  # second evaluation without a new best
    assert sel.best_step == 2 and sel.best_error == 0.5 and sel.improved
    sel.restore_best(p)
    assert p["w"].item() == 2.0
    again = Selection.from_dict(sel.to_dict(), sel.best_state)
    assert again.to_dict() == sel.to_dict()
    worse = Selection(before=0.1, patience=1)
    worse.update(1, 0.2, p)
    assert not worse.improved


def test_a_gain_below_min_improvement_is_not_an_improvement():
    p = {"w": nn.Parameter(torch.tensor([0.0]))}
    noise = Selection(before=1.0, patience=3, min_improvement=0.02)
    noise.update(1, 0.99, p)  # best trained student, but only 1% better: within the noise band
    assert noise.best_step == 1 and not noise.improved and noise.relative_change == pytest.approx(-0.01)
    noise.update(2, 0.97, p)
    assert noise.improved and noise.best_step == 2
    again = Selection.from_dict(noise.to_dict(), noise.best_state)
    assert again.min_improvement == 0.02 and again.improved
    old = {k: v for k, v in noise.to_dict().items() if k != "min_improvement"}  # a checkpoint from before the rule
    assert Selection.from_dict(old, None).min_improvement == 0.0
    assert Selection(before=1.0, patience=1).relative_change is None


def test_learning_rates_scale_with_the_students_error():
    assert error_lr_scale(0.05, 0.2) == pytest.approx(0.25)  # a 4x closer student: 4x smaller steps
    assert error_lr_scale(0.5, 0.2) == 1.0  # never up
    assert error_lr_scale(0.05, None) == 1.0
    assert error_lr_scale(0.0, 0.2) == pytest.approx(1e-3)  # floor: a perfect input still trains
    assert error_lr_scale(0.003, 0.2, min_scale=0.25) == 0.25  # the tiny preset's floor (trained students)
    assert error_lr_scale(0.1, 0.2, min_scale=0.25) == pytest.approx(0.5)
    params = {"l.codebooks": nn.Parameter(torch.zeros(2)), "l.bias": nn.Parameter(torch.zeros(2))}
    opt = make_optimizer(params, OptimSettings(lr=1e-3, lr_codebooks=2e-3, lr_scales=3e-3))
    scale_learning_rates(opt, 0.25)
    assert {g["name"]: (g["lr"], g["base_lr"]) for g in opt.param_groups} == {
        "codebooks": (pytest.approx(5e-4), pytest.approx(5e-4)), "other": (pytest.approx(2.5e-4), pytest.approx(2.5e-4))}


def _toy(seed: int):
    """Teacher: a fixed linear map; student: the same map with a perturbed weight; data: random inputs."""
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Linear(16, 8)
    student = nn.Linear(16, 8)
    with torch.no_grad():
        student.load_state_dict(teacher.state_dict())
        student.weight.add_(0.3 * torch.randn(8, 16, generator=g))
    xs = [torch.randn(32, 16, generator=g) for _ in range(20)]
    xv = torch.randn(64, 16, generator=g)
    with torch.no_grad():
        yv = teacher(xv)

    def loss_fn(x):
        with torch.no_grad():
            y = teacher(x)
        return ((student(x) - y) ** 2).mean()

    def validate():
        with torch.no_grad():
            return float(((student(xv) - yv) ** 2).sum() / (yv ** 2).sum())

    return student, loss_fn, xs, validate


def test_fit_recovers_a_perturbed_student():
    student, loss_fn, xs, validate = _toy(0)
    res = fit(dict(student.named_parameters()), loss_fn, iter(xs * 10), validate, total_steps=150,
              opt=OptimSettings(lr=3e-2, lr_codebooks=3e-2, lr_scales=3e-2), eval_every=10, patience=3)
    assert res.selection.improved and validate() == pytest.approx(res.selection.best_error)
    assert res.selection.best_error < 0.1 * res.selection.before


def test_fit_reports_a_harmful_run_and_returns_its_least_bad_student():
    student, loss_fn, xs, validate = _toy(1)
    res = fit(dict(student.named_parameters()), loss_fn, iter(xs), validate, total_steps=10,
              opt=OptimSettings(lr=5.0, lr_codebooks=5.0, lr_scales=5.0, warmup=0, clip_grad_norm=None),
              eval_every=2, patience=5)
    assert not res.selection.improved and res.steps_run == 10 and len(res.selection.history) == 5
    assert validate() == pytest.approx(min(e for _, e in res.selection.history))


def test_fit_refuses_a_gain_below_min_improvement():
    """The same good run is 'improved' at 0 and refused when it must beat the input by 99.9%."""
    student, loss_fn, xs, validate = _toy(0)
    opt = OptimSettings(lr=3e-2, lr_codebooks=3e-2, lr_scales=3e-2)
    res = fit(dict(student.named_parameters()), loss_fn, iter(xs * 3), validate, total_steps=40, opt=opt,
              eval_every=10, patience=3, min_improvement=0.999)
    assert res.selection.best_error < res.selection.before and not res.selection.improved


def test_fit_with_a_reference_error_takes_smaller_steps():
    """lr_reference_error far above the input's error scales the rates down: the student barely moves."""
    runs = {}
    for ref in (None, 1e3):
        student, loss_fn, xs, validate = _toy(0)
        w0 = student.weight.detach().clone()
        fit(dict(student.named_parameters()), loss_fn, iter(xs), validate, total_steps=10,
            opt=OptimSettings(lr=3e-2, lr_codebooks=3e-2, lr_scales=3e-2, warmup=0), eval_every=10, patience=3,
            lr_reference_error=ref)
        runs[ref] = float((student.weight.detach() - w0).abs().max())
    assert runs[1e3] < 0.01 * runs[None]
