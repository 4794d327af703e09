"""`vqdm distill` on tiny SDXL and tiny Turbo: held-out error drops, codes and size stay, resume is exact,
a harmful run writes nothing."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from vqdm.cli import main
from vqdm.errors import ConfigError
from vqdm.models import build_unet, load_pipeline, quantize_layers, vq_modules
from vqdm.models.artifact import MANIFEST_FILE, WEIGHTS_FILE, load_artifact, load_vq_unet, save_artifact
from vqdm.models.artifact import unet_fingerprint
from vqdm.quantizer.quantize.checkpoint import CheckpointError
from vqdm.quantizer.distill.checkpoint import DistillCheckpoint
from vqdm.quantizer.distill.run import (DecodedWeights, DistillStopped, accumulate_gradients, check_codes_unchanged,
                                        codes_snapshot, distill, output_mse, prepare_student)
from vqdm.quantizer.distill.recipes import recipe
from vqdm.quantizer.sampling import Batch, SamplingConfig, prompt_seed
from vqdm.quantizer.unet_samples import record_trajectories

# Tiny runs: 32 prompts in 2 rounds at 64², 30 Adam steps of 8 samples, lr 3e-4 on every group without warmup,
# not scaled by the student's error (--flat-lr) (validation every 5 steps on 2 prompts, test on 2 others). Random tiny
# models need far more than the real recipe's 1e-6 to move in 30 steps.
FAMILY_ARGS = {
    "sdxl": ["--steps", "4"],
    "sdxl-turbo": ["--steps", "2"],
}
# One seed per prompt: the tests check the machinery; the default's extra seeds (config tests) would double the trajectories.
COMMON = ["--num-prompts", "32", "--seeds-per-prompt", "1", "--rounds", "2", "--resolution", "64", "--train-steps", "30", "--batch-size", "4",
          "--grad-accum", "2", "--lr", "3e-4", "--lr-codebooks", "3e-4", "--lr-scales", "3e-4", "--warmup", "0", "--flat-lr",
          "--gen-batch-size", "2", "--val-prompts", "2", "--test-prompts", "2",
          "--eval-every", "5", "--checkpoint-every", "10", "--no-progress"]
HELD_OUT = ("a lighthouse on a cliff at dusk", "a bowl of ramen, studio photo", "an owl in the snow",
            "a red tram crossing a bridge")


pytestmark = pytest.mark.usefixtures("one_thread")


def quantize_fn(k: int):
    """The real AQ quantizer at cheap settings, identity H (the student only has to be a genuine VQ model)."""
    from vqdm.quantizer import quantize_weight
    from vqdm.quantizer.quantize.config import make_aq_config

    # Pinned (not AQConfig's defaults): the same cheap Adam student whatever the quantizer's defaults.
    cfg = make_aq_config(k, beam_size=2, adam_steps=2, cg_iters=0, damping=0.0, max_rounds=1, init_passes=0)

    def fn(name, w):
        qw = quantize_weight(w, torch.eye(w.shape[1], dtype=torch.float64), cfg)
        return qw.codes, qw.codebooks.detach().float(), qw.scales.detach().float()

    return fn


def make_student(teacher, out, k: int = 2):
    pipe = load_pipeline(teacher)
    quantize_layers(pipe.unet, k, quantize_fn(k))
    layers = {n: {"rel_error": 0.5, "seconds": 0.0} for n, _ in vq_modules(pipe.unet)}
    return save_artifact(pipe, out, {"layers": layers, "calibration": {"note": "test"},
                                     "base_model": {"name": teacher.name, "unet_sha256": unet_fingerprint(source_dir=teacher)}},
                         source_dir=teacher)


def heldout_mse(teacher, artifact, family: str) -> float:
    """Student–teacher U-Net output MSE on prompts and seeds the run never saw."""
    pipe = load_pipeline(teacher)
    cfg = SamplingConfig(num_prompts=len(HELD_OUT), steps=int(FAMILY_ARGS[family][1]),
                            guidance=5.0 if family == "sdxl" else 0.0, resolution=64,
                            scheduler="ddim" if family == "sdxl" else "native")
    batches = [Batch(i, (p,), (prompt_seed(987, i),), cfg.steps) for i, p in enumerate(HELD_OUT)]
    bank = record_trajectories(pipe, cfg, batches)
    unet, _ = load_vq_unet(artifact)
    return output_mse(unet, bank)


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def runs(tiny_sdxl_dir, tiny_turbo_dir, tmp_path_factory):
    out = {}
    for family, teacher in (("sdxl", tiny_sdxl_dir), ("sdxl-turbo", tiny_turbo_dir)):
        root = tmp_path_factory.mktemp(family)
        student = make_student(teacher, root / "student")
        args = ["distill", "--teacher", str(teacher), "--student", str(student), *FAMILY_ARGS[family], *COMMON]
        assert main([*args, "--out", str(root / "distilled")]) == 0
        out[family] = dict(teacher=teacher, student=student, distilled=root / "distilled", args=args, root=root)
    return out


@pytest.mark.parametrize("family", ["sdxl", "sdxl-turbo"])
def test_distillation_reduces_heldout_error_and_keeps_codes(runs, family):
    r = runs[family]
    before = heldout_mse(r["teacher"], r["student"], family)
    after = heldout_mse(r["teacher"], r["distilled"], family)
    print(f"held-out MSE {family}: {before:.5g} -> {after:.5g} ({1 - after / before:.0%} lower)")
    assert after <= 0.8 * before, (before, after)

    a, b = _tensors(r["student"] / WEIGHTS_FILE), _tensors(r["distilled"] / WEIGHTS_FILE)
    assert a.keys() == b.keys()
    codes = [k for k in a if k.endswith(".codes")]
    assert codes and all(torch.equal(a[k], b[k]) for k in codes)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith(".codebooks"))  # codebooks did train
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("conv_in."))  # and non-quantized params
    assert (r["student"] / WEIGHTS_FILE).stat().st_size == (r["distilled"] / WEIGHTS_FILE).stat().st_size

    m_in = json.loads((r["student"] / MANIFEST_FILE).read_text())
    m = json.loads((r["distilled"] / MANIFEST_FILE).read_text())
    d = m["distillation"]
    assert d["train_steps"] == 30 and len(d["loss_curve"]) == d["steps_run"] <= 30
    assert d["improved_on_validation"] and d["val_error_after"] < d["val_error_before"]
    assert [h[0] for h in d["val_history"]][:2] == [5, 10] and 1 <= d["best_step"] <= d["steps_run"]
    assert 0 < d["test_error_after"] < d["test_error_before"]  # the separate test prompts
    assert d["lr"] == 3e-4 and d["effective_batch"] == 8 and d["rounds"] == 2
    assert d["guidance"] == (5.0 if family == "sdxl" else 0.0)
    assert d["scheduler_name"] == ("DDIMScheduler" if family == "sdxl" else "EulerAncestralDiscreteScheduler")
    assert d["vary_steps"] is (family == "sdxl-turbo")
    assert m["calibration"] == m_in["calibration"] and m["base_model"] == m_in["base_model"]
    assert [e["rel_error"] for e in m["layers"]] == [e["rel_error"] for e in m_in["layers"]]

    pipe = load_artifact(r["distilled"])
    img = pipe("a teapot", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and torch.isfinite(torch.as_tensor(img)).all() and img.std() > 0


def test_resume_equals_uninterrupted(runs):
    r = runs["sdxl"]
    out = r["root"] / "resumed"
    with pytest.raises(DistillStopped, match="--resume"):
        main(["-v", *r["args"], "--out", str(out), "--stop-after-step", "17"])
    ckpt = DistillCheckpoint.dir_for(out)
    assert not out.exists() and (ckpt / "state.json").is_file()
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 17 and len(state["loss_curve"]) == 17
    assert sorted(p.name.split("-")[0] for p in ckpt.iterdir()) == ["adam", "best", "params", "state.json"]
    assert [h[0] for h in state["extra"]["selection"]["history"]] == [5, 10, 15]

    with pytest.raises(CheckpointError, match="lr"):  # other settings: refused, checkpoint kept
        main(["-v", *r["args"], "--out", str(out), "--resume", "--lr", "1e-4"])
    with pytest.raises(ConfigError, match="--resume to continue"):
        main(["-v", *r["args"], "--out", str(out)])

    torch.manual_seed(4321)  # a disturbed global RNG must not matter
    assert main([*r["args"], "--out", str(out), "--resume"]) == 0
    assert not ckpt.exists()
    a, b = _tensors(r["distilled"] / WEIGHTS_FILE), _tensors(out / WEIGHTS_FILE)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    da = json.loads((r["distilled"] / MANIFEST_FILE).read_text())["distillation"]
    db = json.loads((out / MANIFEST_FILE).read_text())["distillation"]
    assert da["loss_curve"] == db["loss_curve"]
    assert da["val_history"] == db["val_history"] and da["best_step"] == db["best_step"]
    assert da["test_error_after"] == db["test_error_after"]
    assert db["resumed_from_step"] == 17


def test_harmful_learning_rate_writes_nothing_and_exits_nonzero(runs, capsys):
    """lr 0.3 without warmup or clipping wrecks the student: exit 1 with the figures, no artifact."""
    r = runs["sdxl"]
    harmful = ["--num-prompts", "4", "--seeds-per-prompt", "1", "--rounds", "1", "--train-steps", "4", "--eval-every", "2",
               "--lr", "0.3", "--lr-codebooks", "0.3", "--lr-scales", "0.3", "--warmup", "0", "--clip-grad-norm", "1e9"]
    out = r["root"] / "harmful"
    assert main([*r["args"], *harmful, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no distilled student beat the input on validation" in err and "nothing written" in err
    assert "test" in err and "--allow-worse" in err
    assert not out.exists() and not DistillCheckpoint.dir_for(out).exists()

    assert main([*r["args"], *harmful, "--allow-worse", "--out", str(out)]) == 0  # written when asked, and marked
    d = json.loads((out / MANIFEST_FILE).read_text())["distillation"]
    assert d["improved_on_validation"] is False and d["val_error_after"] >= d["val_error_before"]


def test_min_improvement_refuses_a_gain_within_noise(runs, capsys):
    """The written run beat its input by the default 2%; a run that must beat it by 90% writes nothing."""
    d = json.loads((runs["sdxl"]["distilled"] / MANIFEST_FILE).read_text())["distillation"]
    assert d["min_improvement"] == 0.02 and d["improved_on_validation"] and d["val_change"] <= -0.02
    r = runs["sdxl"]
    cheap = ["--num-prompts", "4", "--seeds-per-prompt", "1", "--rounds", "1", "--train-steps", "4", "--eval-every", "2"]
    out = r["root"] / "strict"
    assert main([*r["args"], *cheap, "--min-improvement", "0.9", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "by the required 90.0%" in err and "nothing written" in err and "--min-improvement" in err
    assert not out.exists() and not DistillCheckpoint.dir_for(out).exists()


def test_learning_rates_scaled_by_the_inputs_validation_error(runs):
    """Without --flat-lr the rates are x min(1, validation error / --lr-reference-error), recorded in the manifest."""
    r = runs["sdxl"]
    out = r["root"] / "scaled"
    assert main(["distill", "--teacher", str(r["teacher"]), "--student", str(r["student"]), "--out", str(out),
                 "--steps", "4", "--num-prompts", "4", "--rounds", "1", "--resolution", "64", "--train-steps", "2",
                 "--seeds-per-prompt", "2",
                 "--batch-size", "4", "--grad-accum", "1", "--val-prompts", "2", "--test-prompts", "0",
                 "--eval-every", "1", "--lr-reference-error", "10", "--lr-min-scale", "0.001", "--allow-worse",
                 "--no-progress"]) == 0
    d = json.loads((out / MANIFEST_FILE).read_text())["distillation"]
    scale = d["val_error_before"] / 10
    assert d["optimizer"]["lr_scale"] == pytest.approx(scale) and d["lr_reference_error"] == 10
    assert d["lr_min_scale"] == 0.001 and scale < 0.25  # below the tiny preset's floor, as asked
    assert d["seeds_per_prompt_used"] == 2 and d["trajectories"] == 8 and sum(d["samples_per_round"]) == 8 * 4  # 4 DDIM steps each
    assert d["optimizer"]["lr"]["codebooks"] == pytest.approx(d["lr_codebooks"] * scale)


def test_inspect_shows_test_figures(runs, capsys):
    d = json.loads((runs["sdxl"]["distilled"] / MANIFEST_FILE).read_text())["distillation"]
    capsys.readouterr()
    assert main(["inspect", str(runs["sdxl"]["distilled"])]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("distillation:"))
    assert f"{d['test_error_before']:.4g} -> {d['test_error_after']:.4g}" in line


def test_refuses_a_teacher_the_student_was_not_quantized_from(runs, tiny_turbo_dir, tmp_path):
    with pytest.raises(ConfigError, match="quantized from another U-Net"):
        distill(tiny_turbo_dir, runs["sdxl"]["student"], tmp_path / "x", recipe("sdxl"), progress=False)
    with pytest.raises(Exception, match="is a vqdm artifact"):
        distill(runs["sdxl"]["student"], runs["sdxl"]["student"], tmp_path / "y", progress=False)


def test_dense_weight_gradients_equal_per_call_reference(simple_quantizer, tiny_sdxl_dir):
    """Decode-once + dense dL/dW pushed through the decode == the kernels' reference path per call."""
    pipe = load_pipeline(tiny_sdxl_dir)
    cfg = SamplingConfig(num_prompts=2, steps=2, guidance=5.0, resolution=64, scheduler="ddim", batch_size=2)
    bank = record_trajectories(pipe, cfg, [Batch(0, ("a fox", "a boat"), (1, 2), 2)])
    grads = {}
    for mode in ("dense", "per-call"):
        unet = build_unet("tiny-sdxl", seed=3)
        quantize_layers(unet, 2, simple_quantizer(2))
        params = prepare_student(unet, recipe("sdxl").replace(weight_grad=mode))
        decoded = DecodedWeights(unet) if mode == "dense" else None
        micro = [torch.tensor([0, 1]), torch.tensor([2, 3])]
        if decoded is not None:
            with decoded.installed():
                accumulate_gradients(unet, bank, micro, "fp32", decoded)
        else:
            accumulate_gradients(unet, bank, micro, "fp32")
        grads[mode] = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    assert grads["dense"].keys() == grads["per-call"].keys()
    assert any(n.endswith("codebooks") for n in grads["dense"]) and any(n.endswith("scales") for n in grads["dense"])
    for n in grads["dense"]:
        a, b = grads["dense"][n], grads["per-call"][n]  # equal up to fp32 summation order
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-12, (n, float((a - b).norm() / b.norm()))


def test_frozen_codes_are_checked(simple_quantizer):
    unet = build_unet("tiny-sdxl", seed=0)
    quantize_layers(unet, 2, simple_quantizer(2))
    before = codes_snapshot(unet)
    check_codes_unchanged(unet, before)
    name, m = vq_modules(unet)[0]
    m.codes[0, 0, 0] += 1
    with pytest.raises(RuntimeError, match="codes of 1 layer"):
        check_codes_unchanged(unet, before)


def test_pv_tuning_moves_codes_keeps_the_format_and_checkpoints_them(runs):
    r = runs["sdxl"]
    pv = ["--pv-every", "2", "--pv-step", "0.5", "--pv-trust", "0.05", "--allow-worse"]
    out = r["root"] / "pv"
    with pytest.raises(DistillStopped):
        main(["-v", *r["args"], *pv, "--out", str(out), "--stop-after-step", "10"])
    saved = _tensors(DistillCheckpoint.dir_for(out) / "params-10.safetensors")
    a = _tensors(r["student"] / WEIGHTS_FILE)
    codes = [k for k in a if k.endswith(".codes")]
    assert codes and all(k in saved for k in codes)  # the moved codes travel with the checkpoint
    assert any(not torch.equal(saved[k].to(torch.uint8), a[k]) for k in codes)
    assert main([*r["args"], *pv, "--out", str(out), "--resume"]) == 0
    b = _tensors(out / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(b[k].dtype == a[k].dtype and b[k].shape == a[k].shape for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in codes)
    assert (r["student"] / WEIGHTS_FILE).stat().st_size == (out / WEIGHTS_FILE).stat().st_size
    d = json.loads((out / MANIFEST_FILE).read_text())["distillation"]
    assert d["pv_every"] == 2 and d["pv_codes_changed"] > 0 and "PV-tuning" in d["trainable"]
    unet, _ = load_vq_unet(out)  # loads: codes within the codebooks' range
    for _, m in vq_modules(unet):
        assert int(m.codes.max()) < m.codebooks.shape[1]


def test_pv_tuning_needs_dense_weight_gradients():
    with pytest.raises(ConfigError, match="--weight-grad dense"):
        recipe("sdxl").replace(pv_every=5, weight_grad="per-call")
