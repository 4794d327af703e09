"""`vqdm eval` and its metrics: PSNR/SSIM by definition, Fréchet distance in closed form, FID Inception
layout, and an end-to-end run on tiny SDXL (reference vs itself and vs a 2-bit artifact)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vqdm.cli import main
from vqdm.errors import ConfigError
from vqdm.models import load_pipeline, quantize_layers
from vqdm.models.artifact import save_artifact, unet_fingerprint
from vqdm.quantizer.evaluate.fid import (FIDInceptionV3, feature_statistics, features_to_statistics_distance,
                                         frechet_distance, load_inception)
from vqdm.quantizer.evaluate.image_metrics import gaussian_window, psnr, ssim


pytestmark = pytest.mark.usefixtures("one_thread")


# -- metrics ---------------------------------------------------------------------------------------
def _ssim_by_definition(x: np.ndarray, y: np.ndarray, size: int, sigma: float, peak: float) -> float:
    """Wang et al. 2004, window by window (valid positions), one channel, independent of the torch code."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    vals = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            a, b = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_psnr_and_ssim_match_their_definitions():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 20, generator=gen, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    assert torch.isinf(psnr(x, x, 1.0)).all() and torch.allclose(ssim(x, x, 1.0), torch.ones(2, dtype=torch.float64))

    mse = ((x - y) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(psnr(x, y, 1.0), 10 * torch.log10(1 / mse))
    got = ssim(x, y, 1.0)
    for n in range(2):
        want = np.mean([_ssim_by_definition(x[n, c].numpy(), y[n, c].numpy(), 11, 1.5, 1.0) for c in range(3)])
        assert abs(float(got[n]) - want) < 1e-10
    # constant images a and a + c: the SSIM map is the luminance term everywhere
    a, c = 0.3, 0.2
    flat = torch.full((1, 1, 16, 16), a, dtype=torch.float64)
    c1 = (0.01) ** 2
    assert float(ssim(flat, flat + c, 1.0)) == pytest.approx((2 * a * (a + c) + c1) / (a**2 + (a + c) ** 2 + c1))
    # smaller than the window: the window shrinks to the largest odd size that fits (8 -> 7)
    small_x, small_y = x[:, :, :8, :8], y[:, :, :8, :8]
    want = np.mean([_ssim_by_definition(small_x[0, c].numpy(), small_y[0, c].numpy(), 7, 1.5, 1.0) for c in range(3)])
    assert float(ssim(small_x, small_y, 1.0)[0]) == pytest.approx(want, abs=1e-10)
    assert gaussian_window(11).sum() == pytest.approx(1.0)


def test_frechet_distance_closed_form():
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    d1, d2 = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1, torch.rand(6, generator=gen, dtype=torch.float64)
    s1, s2 = q @ torch.diag(d1) @ q.T, q @ torch.diag(d2) @ q.T  # commuting: tr sqrt(S1 S2) = Σ sqrt(d1 d2)
    mu1, mu2 = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    want = float(((mu1 - mu2) ** 2).sum() + d1.sum() + d2.sum() - 2 * (d1 * d2).sqrt().sum())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    f = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    mu, sigma = feature_statistics(f)
    centred = f - f.mean(0)
    torch.testing.assert_close(torch.from_numpy(mu), f.mean(0))
    torch.testing.assert_close(torch.from_numpy(sigma), centred.T @ centred / (len(f) - 1))  # unbiased
    # fewer images than dimensions (eval's FID on a few prompts): the n×n route gives the D×D figure,
    # up to the D×D route's own noise (it takes square roots of the round-off eigenvalues, ~1e-8 each,
    # where S1 has rank n-1 < D)
    for n in (2, 3, 5, 6, 40):
        few = torch.randn(n, 6, generator=gen, dtype=torch.float64) * 2 + 1
        want = frechet_distance(*feature_statistics(few), mu2, s2)
        assert features_to_statistics_distance(few, mu2, s2) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 images"):
        features_to_statistics_distance(few[:1], mu2, s2)


def test_fid_inception_layout(tmp_path):
    from safetensors.torch import save_file

    net = FIDInceptionV3()
    # torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and with
    # pytorch-fid's 1008-way fc (+16,392): 23,850,960, the network pytorch-fid's weights fit.
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    state = {k: v.clone() for k, v in net.state_dict().items()}
    save_file(state, str(tmp_path / "inception.safetensors"))
    loaded = load_inception(tmp_path / "inception.safetensors")
    images = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        assert loaded(images).shape == (2, 2048)
        torch.testing.assert_close(loaded(images), net.eval()(images))
    save_file({"fc.weight": state["fc.weight"]}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ConfigError, match="not FID Inception-v3 weights"):
        load_inception(tmp_path / "wrong.safetensors")
    (tmp_path / "pt_inception.pth").write_bytes(b"x")
    with pytest.raises(ConfigError, match="no pickles"):
        load_inception(tmp_path / "pt_inception.pth")


# -- the command -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def student(tiny_sdxl_dir, simple_quantizer, tmp_path_factory):
    pipe = load_pipeline(tiny_sdxl_dir)
    quantize_layers(pipe.unet, 2, simple_quantizer(2))
    return save_artifact(pipe, tmp_path_factory.mktemp("eval") / "k2",
                         {"base_model": {"unet_sha256": unet_fingerprint(source_dir=tiny_sdxl_dir)}},
                         source_dir=tiny_sdxl_dir)


def _tiny_clip(path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from vqdm.models.tokenizers import build_clip_tokenizer

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=small, vision_config={**small, "image_size": 32, "patch_size": 8},
                         projection_dim=16)).save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=build_clip_tokenizer()).save_pretrained(path)
    return path


def test_eval_reference_vs_itself_and_a_2bit_artifact(tiny_sdxl_dir, student, tmp_path):
    from safetensors.torch import save_file

    clip = _tiny_clip(tmp_path / "clip")
    save_file(FIDInceptionV3().state_dict(), str(tmp_path / "inception.safetensors"))
    gen = np.random.default_rng(0)
    feats = gen.normal(size=(64, 2048))
    np.savez(tmp_path / "stats.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    out = tmp_path / "eval"
    args = ["eval", "--reference", str(tiny_sdxl_dir), "--candidate", str(tiny_sdxl_dir), "--candidate", str(student),
            "--out", str(out), "--num-prompts", "3", "--steps", "3", "--resolution", "128", "--grid-rows", "2",
            "--chunk-prompts", "2", "--unet-mse-prompts", "1", "--clip-model", str(clip), "--no-progress"]
    assert main([*args, "--fid-stats", str(tmp_path / "stats.npz"), "--inception", str(tmp_path / "inception.safetensors")]) == 0

    res = json.loads((out / "eval.json").read_text())
    meta = json.loads((out / "eval_meta.json").read_text())
    same, vq = res[str(tiny_sdxl_dir)], res[str(student)]
    assert same["unet_rel_mse"] == 0 and same["latent_mse"] == 0
    assert math.isinf(same["psnr"]) and math.isinf(same["latent_psnr"])
    assert same["ssim"] == pytest.approx(1.0) and same["latent_ssim"] == pytest.approx(1.0)
    assert same["clip_score"] == meta["reference_scores"]["clip_score"]
    assert same["fid"] == pytest.approx(meta["reference_scores"]["fid"], rel=1e-9)
    assert 0 < vq["unet_rel_mse"] < 1 and vq["latent_mse"] > 0
    assert 10 < vq["psnr"] < 80 and 0 < vq["ssim"] < 1 and 0 < vq["latent_ssim"] < 1
    assert -1 <= vq["clip_score"] <= 1 and vq["fid"] > 0
    assert [s["step"] for s in vq["unet_rel_mse_per_step"]] == [0, 1, 2]
    assert all(s["rel_mse"] > 0 for s in vq["unet_rel_mse_per_step"])
    assert vq["kind"] == "vq" and vq["num_codebooks"] == 2 and same["kind"] == "dense"
    assert len(meta["prompts"]) == 3 and meta["settings"]["guidance"] == 5.0
    assert meta["unet_mse_prompts"] == 2  # chunks of 2 prompts: the first chunk's trajectories

    md = (out / "eval.md").read_text()
    assert f"| `{student}` |" in md and "| reference |" in md and "step 2" in md and "∞" in md
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * 128, 18 + 2 * 128)  # reference + 2 candidates, 2 prompt rows

    with pytest.raises(ConfigError, match="needs both --fid-stats"):
        main(["-v", *args, "--fid-stats", str(tmp_path / "stats.npz")])


def test_unet_rel_mse_matches_an_independent_calculation(tiny_sdxl_dir, student, tmp_path):
    """`unet_rel_mse` (vqdm eval's figure, and distillation's validation error behind the grid and
    the never-worse rule) against plain torch: the reference U-Net's calls during diffusers' own
    sampling are captured with a forward hook, replayed on the candidate, and Σ|ε_cand − ε_ref|² /
    Σ|ε_ref|² summed in float64 in a loop of this test's own (no SampleRecorder, bank or Tally)."""
    from vqdm.models.artifact import load_vq_unet
    from vqdm.quantizer.distill.run import relative_error
    from vqdm.quantizer.evaluate.config import EvalConfig
    from vqdm.quantizer.evaluate.run import evaluate
    from vqdm.quantizer.sampling import load_prompts, plan_batches
    from vqdm.quantizer.unet_samples import record_trajectories

    cfg = EvalConfig.for_family("sdxl", num_prompts=2, steps=3, resolution=64, grid_rows=1, chunk_prompts=2,
                                unet_mse_prompts=2)
    got = evaluate(tiny_sdxl_dir, [student], tmp_path / "eval", cfg, progress=False)[str(student)]["unet_rel_mse"]

    pipe = load_pipeline(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    candidate, _ = load_vq_unet(student)
    calls = []
    hook = pipe.unet.register_forward_hook(
        lambda _, args, kwargs, out: calls.append((args, kwargs, out[0].detach().clone())), with_kwargs=True)
    with torch.no_grad():
        for i, prompt in enumerate(load_prompts(None)[:2]):  # prompt i is sampled with seed i (run seed 0)
            pipe(prompt=[prompt], num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                 generator=[torch.Generator("cpu").manual_seed(i)], output_type="latent")
        hook.remove()
        err = ref = 0.0
        for args, kwargs, eps_ref in calls:
            eps = candidate(*args, **kwargs)[0]
            err += float(((eps.double() - eps_ref.double()) ** 2).sum())
            ref += float((eps_ref.double() ** 2).sum())
    assert len(calls) == 2 * 3 and 0 < err / ref < 1
    assert got == pytest.approx(err / ref, rel=1e-6)

    # distillation's validation error on the same trajectories
    bank = record_trajectories(pipe, cfg.sampling, plan_batches(cfg.sampling, load_prompts(None)))
    assert relative_error(candidate, bank) == pytest.approx(err / ref, rel=1e-6)
