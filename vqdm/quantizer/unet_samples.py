"""U-Net calls of the real sampling loop, recorded: the teacher samples of distillation and evaluation.

A sample is one prompt at one denoising step: the U-Net input x_t, its timestep, the prompt's
conditioning (text embeddings, pooled embedding, time ids) and the U-Net's output there. With CFG
a sample holds both halves (unconditional, conditional) of the batch the pipeline builds, so a
loss over samples covers both, as SPEC §4 asks; without CFG (Turbo) a sample is one row.

`SampleRecorder` hooks a U-Net while `sampling.run_trajectories` (the one sampling loop)
drives the pipeline; `SampleBank` holds what it saw on the CPU
in the pipeline's dtype, conditioning once per prompt (it is the same at every step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from vqdm.quantizer.sampling import Batch, SamplingConfig, run_trajectories


@dataclass
class SampleBank:
    """Recorded U-Net calls; S samples of h rows (h = 2 with CFG: uncond, cond), P prompts."""

    x: torch.Tensor  # [S, h, C, H, W] U-Net input x_t (after the scheduler's input scaling)
    t: torch.Tensor  # [S] float32 timestep
    target: torch.Tensor  # [S, h, C, H, W] the recorded U-Net's output
    prompt: torch.Tensor  # [S] int64 index into the conditioning tensors
    step: torch.Tensor  # [S] int64 denoising step of the sample within its trajectory
    embeds: torch.Tensor  # [P, h, L, D] encoder_hidden_states
    text_embeds: torch.Tensor  # [P, h, Dp] pooled text embedding (added cond)
    time_ids: torch.Tensor  # [P, h, 6] size / crop conditioning (added cond)

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def halves(self) -> int:
        return self.x.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.__dict__.values())

    def unet_inputs(self, idx: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> tuple[dict, torch.Tensor]:
        """(kwargs for unet(**kwargs), target rows) for samples `idx`, rows flattened sample-major."""
        p = self.prompt[idx]

        def rows(t: torch.Tensor) -> torch.Tensor:  # [B, h, ...] -> [B*h, ...]
            return t.reshape(-1, *t.shape[2:]).to(device=device, dtype=dtype, non_blocking=True)

        kwargs = {
            "sample": rows(self.x[idx]),
            "timestep": self.t[idx].repeat_interleave(self.halves).to(device),
            "encoder_hidden_states": rows(self.embeds[p]),
            "added_cond_kwargs": {"text_embeds": rows(self.text_embeds[p]), "time_ids": rows(self.time_ids[p])},
        }
        return kwargs, rows(self.target[idx])


class SampleRecorder:
    """Forward hook on a U-Net recording every call as samples; use as a context manager.

    Call `new_batch(batch)` before each pipeline call (run_trajectories' `before_batch`), so the
    recorder knows which prompts the rows belong to; `bank()` assembles the result.
    """

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self._calls: list[tuple] = []  # (x [B,h,...], t, target [B,h,...], prompt ids [B], step)
        self._cond: list[tuple] = []  # per prompt: (embeds [h,L,D], text_embeds [h,Dp], time_ids [h,6])
        self._prompts: list[int] = []  # prompt ids of the current batch
        self._step = 0
        self._need_cond = False
        self._handle = None

    def __enter__(self) -> "SampleRecorder":
        self._handle = self.unet.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def new_batch(self, batch: Batch) -> None:
        first = len(self._cond)
        self._prompts = list(range(first, first + len(batch.prompts)))
        self._step = 0
        self._need_cond = True

    def _hook(self, module, args, kwargs, output) -> None:
        if not self._prompts:
            raise RuntimeError("SampleRecorder: U-Net called before new_batch(); pass it as before_batch")
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        out = output[0] if isinstance(output, tuple) else output.sample
        cond = kwargs["added_cond_kwargs"]
        b = len(self._prompts)
        h = sample.shape[0] // b
        if h * b != sample.shape[0] or h not in (1, 2):
            raise RuntimeError(f"U-Net batch of {sample.shape[0]} rows for {b} prompt(s): "
                               "expected 1 row per prompt, or 2 with CFG (num_images_per_prompt must be 1)")

        def per_prompt(t: torch.Tensor) -> torch.Tensor:
            # diffusers stacks CFG as [uncond x B, cond x B]: rows -> [B, h, ...]
            return t.detach().reshape(h, b, *t.shape[1:]).transpose(0, 1).to("cpu", copy=True)

        if self._need_cond:
            embeds, text, ids = (per_prompt(t) for t in (kwargs["encoder_hidden_states"], cond["text_embeds"],
                                                          cond["time_ids"]))
            self._cond.extend(zip(embeds, text, ids))
            self._need_cond = False
        t = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
        self._calls.append((per_prompt(sample), t, per_prompt(out), list(self._prompts), self._step))
        self._step += 1

    def bank(self) -> SampleBank:
        """The recorded samples; the per-call chunks are released while copying (peak ~1x)."""
        if not self._calls:
            raise RuntimeError("no U-Net calls were recorded")
        s = sum(c[0].shape[0] for c in self._calls)
        x0 = self._calls[0][0]
        x = torch.empty(s, *x0.shape[1:], dtype=x0.dtype)
        target = torch.empty_like(x)
        t = torch.empty(s, dtype=torch.float32)
        prompt = torch.empty(s, dtype=torch.int64)
        step = torch.empty(s, dtype=torch.int64)
        pos = 0
        calls, self._calls = self._calls, []
        calls.reverse()
        while calls:
            cx, ct, cout, ids, k = calls.pop()
            n = cx.shape[0]
            x[pos:pos + n], target[pos:pos + n] = cx, cout
            t[pos:pos + n], prompt[pos:pos + n], step[pos:pos + n] = ct, torch.tensor(ids), k
            pos += n
        embeds, text, ids = (torch.stack(c) for c in zip(*self._cond))
        return SampleBank(x, t, target, prompt, step, embeds, text, ids)


def record_trajectories(pipe, cfg: SamplingConfig, batches: list[Batch], progress=None) -> SampleBank:
    """Sample `batches` with the pipeline (the shared sampling loop) and return every U-Net call it made."""
    with SampleRecorder(pipe.unet) as rec:
        run_trajectories(pipe, cfg, batches, before_batch=rec.new_batch, progress=progress)
    return rec.bank()


@torch.no_grad()
def unet_predictions(unet: nn.Module, bank: SampleBank, batch_size: int = 8, dtype: torch.dtype | None = None
                     ) -> torch.Tensor:
    """`unet`'s outputs [S, h, C, H, W] (CPU float32) on the recorded inputs of `bank`."""
    param = next(unet.parameters())
    dtype = dtype or param.dtype
    out = torch.empty(bank.target.shape, dtype=torch.float32)
    for start in range(0, len(bank), batch_size):
        idx = torch.arange(start, min(len(bank), start + batch_size))
        kwargs, _ = bank.unet_inputs(idx, param.device, dtype)
        pred = unet(**kwargs, return_dict=False)[0]
        out[idx] = pred.float().cpu().reshape(len(idx), bank.halves, *pred.shape[1:])
    return out
