"""The stall watchdog, on explicit clock values (no sleeping)."""
from __future__ import annotations

from vqdm.server.watchdog import Watchdog


def test_reports_a_device_without_progress_once():
    stalled = []
    w = Watchdog(10.0, lambda device, seconds: stalled.append((device, round(seconds))))
    w.begin("cpu")
    start = w._last["cpu"]
    assert w.check(start + 5) == [] and stalled == []
    w.beat("cpu")
    beat = w._last["cpu"]
    assert w.check(beat + 9) == []  # progress resets the clock
    assert w.check(beat + 11) == ["cpu"] and stalled == [("cpu", 11)]
    assert w.check(beat + 50) == []  # reported once
    assert w.busy() == ["cpu"]


def test_idle_devices_are_never_stalled():
    w = Watchdog(1.0, lambda *a: None)
    w.begin("cuda:0")
    w.end("cuda:0")
    w.beat("cuda:0")  # a late beat from a hook does not make an idle device busy
    assert w.check(1e12) == [] and w.busy() == []


def test_vae_encoding_beats_block_by_block():
    """img2img and inpainting encode their images with the VAE encoder: every one of its blocks is
    progress, as the decoder's are, so a large batch encoding on CPU is not declared hung."""
    import types

    import torch
    from diffusers import AutoencoderKL

    from vqdm.models import Preset
    from vqdm.server.watchdog import install_progress_hooks

    vae = AutoencoderKL.from_config(Preset.from_name("tiny-sdxl").vae).eval()
    pipe = types.SimpleNamespace(vae=vae)  # a pipeline's parts the hooks look for: here only its VAE
    beats = []
    install_progress_hooks(pipe, lambda module, _args: beats.append(module))
    with torch.no_grad():
        vae.encode(torch.zeros(2, 3, 64, 64))
    assert beats == [vae.encoder, *vae.encoder.down_blocks]
