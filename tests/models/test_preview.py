"""The cheap preview decoder of streamed partial images (vqdm.models.preview) against its reference,
the model's own VAE decode, on the shipped trained digits model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vqdm.models.preview import (LatentPreview, _neighbourhoods, clean_estimate, fit_latent_preview, fit_linear_map,
                                 preview_rgb, preview_steps)


def test_preview_steps_are_evenly_spaced_before_the_last_and_fewer_when_steps_are_few():
    assert preview_steps(20, 2) == [7, 13]
    assert preview_steps(20, 3) == [5, 10, 15]
    assert preview_steps(20, 1) == [10]
    assert preview_steps(20, 0) == []
    assert preview_steps(3, 3) == [1, 2]  # only two steps come before the last
    assert preview_steps(2, 2) == [1]
    assert preview_steps(1, 3) == []
    for total in range(1, 40):
        for count in range(4):
            steps = preview_steps(total, count)
            assert len(steps) == min(count, total - 1) and steps == sorted(set(steps))
            assert all(1 <= s < total for s in steps)


def test_fit_linear_map_recovers_a_linear_decoder_and_skips_non_finite_cells():
    g = torch.Generator().manual_seed(0)
    truth = LatentPreview(torch.randn(4 * 9 + 1, 3 * 2 * 2, generator=g) * 0.1, factor=2)
    latents = torch.randn(6, 4, 5, 7, generator=g)
    blocks = _neighbourhoods(latents) @ truth.weight  # what the true map draws, unclamped
    images = F.fold(blocks.reshape(6, 35, 12).permute(0, 2, 1), (10, 14), 2, stride=2)
    images[0, :, 0, 0] = float("inf")  # an overflowed decode
    fit = fit_linear_map(latents, images, factor=2)
    torch.testing.assert_close(fit.weight, truth.weight, atol=1e-4, rtol=1e-4)
    drawn = preview_rgb(latents[1:], truth)
    assert drawn.dtype == torch.uint8 and drawn.shape == (5, 10, 14, 3)
    want = ((images[1:].clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1)
    assert (drawn.float() - want).abs().max() <= 1


@pytest.fixture(scope="module")
def digits():
    """The trained digits pipeline, its preview map, and latents of three digits it drew."""
    from vqdm.models import load_pipeline
    from vqdm.models.digits import DIGITS_MODEL_DIR, digit_prompt

    # One thread: tiny tensors on a shared 2-core machine, where a second thread spin-waits against
    # other processes (as in tests/server/test_embedded.py).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = load_pipeline(DIGITS_MODEL_DIR)
    preview = fit_latent_preview(pipe)
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    with torch.inference_mode():
        latents = pipe(prompt=[digit_prompt(d) for d in (0, 3, 7)], num_inference_steps=8, guidance_scale=4.0,
                       generator=gens, output_type="latent").images
    yield pipe, preview, latents
    torch.set_num_threads(saved)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().float(), b.flatten().float()]))[0, 1])


def test_preview_of_real_latents_correlates_with_the_real_decode(digits):
    from vqdm.models.vae import vae_decode

    pipe, preview, latents = digits
    with torch.inference_mode():
        decoded = vae_decode(pipe, latents).float().clamp(-1, 1)
    cheap = preview_rgb(latents, preview).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert cheap.shape == decoded.shape
    for i in range(len(latents)):
        assert _correlation(cheap[i], decoded[i]) > 0.85, i
        assert _correlation(cheap[i], decoded[(i + 1) % 3]) < _correlation(cheap[i], decoded[i]) - 0.2  # its own digit


def test_clean_estimate_of_each_kind_of_sampler_is_the_image_early(digits):
    """Halfway through, the sampler's clean-latent estimate previews close to the finished image:
    Euler reports pred_original_sample (as Euler ancestral and DDIM do); DPM-Solver++ and UniPC keep
    it as their converted model output."""
    from vqdm.models.schedulers import swapped_scheduler
    from vqdm.server.samplers import SAMPLERS

    pipe, preview, _ = digits
    for name in ("euler", "dpmpp_2m", "unipc"):
        with swapped_scheduler(pipe, SAMPLERS[name].class_name) as p:
            kept, step = [], p.scheduler.step

            def keep(*args, return_dict=True, **kwargs):
                out = step(*args, return_dict=True, **kwargs)
                kept.append(clean_estimate(p.scheduler, out))
                return out if return_dict else out.to_tuple()

            p.scheduler.step = keep
            with torch.inference_mode():
                final = p(prompt=["handwritten 3"], num_inference_steps=6, guidance_scale=4.0, output_type="latent",
                          generator=[torch.Generator().manual_seed(1)]).images
        assert len(kept) == 6 and all(x is not None for x in kept), name
        assert _correlation(preview_rgb(kept[3], preview), preview_rgb(final, preview)) > 0.8, name
