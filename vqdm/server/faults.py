"""Test-only fault injection inside the real serving path, for faults a CPU test machine cannot
produce on demand (CUDA out-of-memory, a sticky CUDA error, a hung kernel).

Off unless the server process starts with `VQDM_TEST_FAULTS=1`; then it logs a warning and each
replica's U-Net gets a forward pre-hook (`install`). A fault is asked for by a marker in a
request's prompt, so one live server can be driven through several faults:

    [fault:oom@S]            torch.OutOfMemoryError at denoising step S (1-based)
    [fault:oom-batched@S]    the same, but only while the job shares its batch with others
    [fault:error@S]          RuntimeError (a bug in the pipeline)
    [fault:cuda-error@S]     RuntimeError("CUDA error: an illegal memory access ...") that poisons the device
    [fault:hang@S]           the step blocks until the process exits (a hung kernel)
    [fault:after-batch]      RuntimeError in the dispatcher after the pipeline returned

The dispatcher arms the injector with a batch's prompts just before running it (`arm`), in the
worker thread that runs the batch; the pre-hook then counts U-Net calls of that batch.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass

import torch

log = logging.getLogger("vqdm.server")

ENV_VAR = "VQDM_TEST_FAULTS"
_MARKER_RE = re.compile(r"\[fault:([a-z-]+)(?:@(\d+))?\]")
KINDS = ("oom", "oom-batched", "error", "cuda-error", "hang", "after-batch")
CUDA_ERROR_TEXT = "CUDA error: an illegal memory access was encountered (injected by VQDM_TEST_FAULTS)"


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "") == "1"


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int = 1


def parse(prompt: str) -> list[Fault]:
    out = []
    for kind, step in _MARKER_RE.findall(prompt):
        if kind not in KINDS:
            raise ValueError(f"unknown test fault {kind!r}; known: {', '.join(KINDS)}")
        out.append(Fault(kind, int(step or 1)))
    return out


class FaultInjector:
    """One per server process; state is per worker thread (one batch at a time per device)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._exiting = threading.Event()  # set at process exit so a 'hung' step can end

    def arm(self, prompts: list[str]) -> None:
        """Before a batch: remember its faults; `prompts` holds one entry per job of the batch."""
        faults = [f for p in prompts for f in parse(p)]
        self._local.faults, self._local.calls, self._local.jobs = faults, 0, len(prompts)

    def after_batch(self, prompts: list[str]) -> None:
        """On the event loop, after the pipeline returned: the dispatcher's own code path."""
        if any(f.kind == "after-batch" for p in prompts for f in parse(p)):
            raise RuntimeError("injected failure after the batch (VQDM_TEST_FAULTS)")

    def release(self) -> None:
        self._exiting.set()

    def pre_forward(self, _module, _args) -> None:
        """U-Net forward pre-hook: one call per denoising step (CFG runs both halves in one call)."""
        faults = getattr(self._local, "faults", [])
        if not faults:
            return
        self._local.calls += 1
        step = self._local.calls
        for f in faults:
            if f.step != step:
                continue
            if f.kind == "oom" or (f.kind == "oom-batched" and self._local.jobs > 1):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by "
                                             "VQDM_TEST_FAULTS)")
            if f.kind == "error":
                raise RuntimeError("injected pipeline failure (VQDM_TEST_FAULTS)")
            if f.kind == "cuda-error":
                raise RuntimeError(CUDA_ERROR_TEXT)
            if f.kind == "hang":
                log.warning("test fault: step %d hangs until the process exits", step)
                self._exiting.wait()


def install(pipe, injector: FaultInjector) -> None:
    pipe.unet.register_forward_pre_hook(injector.pre_forward)
