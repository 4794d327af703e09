"""Liveness that means it: a device whose running batch makes no progress for `stall_s` seconds
(a hung kernel, a deadlock) is reported stalled, once. Progress is any forward call of the
pipeline's models (text encoders, each U-Net step, the VAE encoder of an edit and the decoder, each
block by block), so a long VAE encode or decode at a large size is not mistaken for a hang;
`stall_s` bounds the longest single forward pass.

Beats come from the device's worker thread; the check runs on the event loop.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

log = logging.getLogger("vqdm.server")


class Watchdog:
    def __init__(self, stall_s: float, on_stall: Callable[[str, float], None]) -> None:
        self.stall_s = stall_s
        self.on_stall = on_stall  # (device, seconds without progress), called on the event loop
        self._last: dict[str, float | None] = {}  # device -> last progress; None while idle
        self._reported: set[str] = set()

    # -- worker side (any thread) ---------------------------------------------------------------
    def begin(self, device: str) -> None:
        self._last[device] = time.monotonic()

    def beat(self, device: str) -> None:
        if self._last.get(device) is not None:
            self._last[device] = time.monotonic()

    def end(self, device: str) -> None:
        self._last[device] = None

    def busy(self) -> list[str]:
        """Devices whose thread is inside a batch right now."""
        return [d for d, last in self._last.items() if last is not None]

    def hook_for(self, device: str):
        """A forward pre-hook that counts as progress on `device`."""
        return lambda _module, _args: self.beat(device)

    # -- event loop -------------------------------------------------------------------------------
    def check(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        stalled = []
        for device, last in list(self._last.items()):
            if last is not None and device not in self._reported and now - last > self.stall_s:
                self._reported.add(device)
                stalled.append(device)
                self.on_stall(device, now - last)
        return stalled

    async def run(self) -> None:
        period = max(0.05, min(1.0, self.stall_s / 4))
        while True:
            await asyncio.sleep(period)
            self.check()


def install_progress_hooks(pipe, hook) -> None:
    """Every model the pipeline runs reports progress through `hook` (a forward pre-hook)."""
    for name in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.register_forward_pre_hook(hook)
    if getattr(pipe, "vae", None) is not None:
        # The encoder runs for edits (img2img, inpainting: image and masked image), the decoder for
        # every image; a big batch of either is long, so each beats inside too, block by block.
        for coder, blocks in ((pipe.vae.encoder, pipe.vae.encoder.down_blocks),
                              (pipe.vae.decoder, pipe.vae.decoder.up_blocks)):
            coder.register_forward_pre_hook(hook)
            for block in blocks:
                block.register_forward_pre_hook(hook)
