"""Run one batch of compatible jobs through a diffusers SDXL pipeline (blocking; the server calls it
in the device's worker thread, `vqdm generate` calls it directly).

Determinism: every image row gets its own `torch.Generator` on the replica's device, seeded with
its job's seed + i, so initial latents and ancestral noise depend only on that seed and the device,
never on the batch it ran in; the noise is drawn where it is used, never copied over each step.
(Batched GEMMs may round differently from unbatched ones: pixels can differ by one level of 255.)

Compiled serving (`vqdm.server.compiled`): when the replica has compiled graphs, each batch tells
them whether it may use them (not with an adapter set or a weight cache; not after it shrank), and
the outcome carries how many steps ran compiled and why the others did not.

Cancellation: a member whose `is_cancelled()` turns true is noticed at the next denoising step.
With a stateless sampler its rows are removed from the batch there (latents, both CFG halves of
the text embeddings, its generators), so the rest of the batch runs smaller; with a multistep
sampler its rows keep running and its images are dropped. When every member is cancelled the
pipeline is interrupted. The VAE decodes only the rows still wanted.

Partial images: a member with `on_preview` and `params.partial_images` > 0 gets that many previews
per image, after evenly spaced steps (`vqdm.models.preview.preview_steps`), decoded cheaply from the
sampler's clean-latent estimate by the replica's linear latent→RGB map (fitted at the first such
request). Only then is the scheduler's step wrapped to capture that estimate: a batch in which no
member asked for previews runs exactly as before.
"""
from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from PIL import Image

from vqdm.models.preview import clean_estimate, fit_latent_preview, preview_rgb, preview_steps
from vqdm.models.schedulers import swapped_scheduler
from vqdm.models.vae import vae_decode  # the decode evaluation uses too
from vqdm.server import samplers
from vqdm.server.compiled import batch_fallback
from vqdm.server.edit_pipeline import edit_call, paste_back
from vqdm.server.jobs import GenerationParams
from vqdm.server.sizes import resized

if TYPE_CHECKING:
    from vqdm.server.loader import Replica

# Tensors the SDXL pipeline hands to `callback_on_step_end`; shrinking a batch edits all four.
_STEP_TENSORS = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]


@dataclass
class Member:
    params: GenerationParams
    is_cancelled: Callable[[], bool] = lambda: False
    on_step: Callable[[int, int], None] = lambda step, total: None  # called in the worker thread
    # (image index within the member, partial image index, PIL preview at the output size), called in
    # the worker thread params.partial_images times per image; None: no previews are made.
    on_preview: Callable[[int, int, Any], None] | None = None

    @property
    def wants_previews(self) -> bool:
        return self.on_preview is not None and self.params.partial_images > 0


@dataclass
class BatchOutcome:
    images: list[list[Any] | None]  # per member: PIL images (one per seed), None if cancelled
    revised_prompts: list[str | None]
    cancelled_at_step: list[int | None]
    rows: int  # images in the pipeline call
    prompt_tokens: list[int] = field(default_factory=list)  # per member: CLIP tokens the model read
    latent_cells: int = 0  # latent positions per image (height x width of the U-Net's input)
    step_seconds: list[float] = field(default_factory=list)
    text_encode_s: float = 0.0
    denoise_s: float = 0.0
    vae_decode_s: float = 0.0
    weight_decode_s: float | None = None  # None: no weight cache, decode time is not separable
    total_s: float = 0.0
    compile_mode: str | None = None  # None: no compiled graphs on this replica
    compiled_steps: dict[str, int] = field(default_factory=dict)  # fallback reason ("none": compiled) -> U-Net calls

    def timings(self) -> dict[str, float]:
        t = {"text_encode_s": self.text_encode_s, "denoise_s": self.denoise_s,
             "vae_decode_s": self.vae_decode_s, "inference_s": self.total_s}
        if self.weight_decode_s is not None:
            t["weight_decode_s"] = self.weight_decode_s
        return {k: round(v, 6) for k, v in t.items()}


class _Clock:
    """Marks on the device's own timeline: on CUDA, events recorded in stream order (the host never
    waits for them while the batch runs; they are read once it is done), so GPU work is charged to
    the step that queued it; on CPU, perf_counter."""

    def __init__(self, device) -> None:
        self.device, self.cuda = device, device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000


def revised_prompt(tokenizer, prompt: str) -> str | None:
    """The part of the prompt the model actually reads when CLIP's 77-token window cuts it (the
    longest whole-word prefix that fits), else None."""
    limit = tokenizer.model_max_length

    def fits(text: str) -> bool:
        return len(tokenizer(text, truncation=False).input_ids) <= limit

    if fits(prompt):
        return None
    ends = [m.end() for m in re.finditer(r"\S+", prompt)]
    lo, hi = 0, len(ends)  # ends[:lo] fit, ends[:hi + 1] do not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(prompt[:ends[mid - 1]]):
            lo = mid
        else:
            hi = mid - 1
    return prompt[:ends[lo - 1]] if lo else ""


def prompt_tokens(tokenizer, prompt: str) -> int:
    """CLIP tokens of `prompt` the model reads (start and end tokens included, cut at the window)."""
    return min(len(tokenizer(prompt, truncation=False).input_ids), tokenizer.model_max_length)


def decode_latents(pipe, latents) -> list:
    """The pipeline's own VAE decode and post-processing, callable on a subset of rows."""
    with torch.inference_mode():
        image = vae_decode(pipe, latents)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="pil")


def _shrink(kw: dict, keep: list[int], cfg: bool) -> dict:
    """Keep image rows `keep` of the step tensors. With CFG the embeddings are [negatives; positives]."""
    rows = kw["latents"].shape[0]
    out = {"latents": kw["latents"][keep]}
    halves = keep + [rows + r for r in keep] if cfg else keep
    out["prompt_embeds"] = kw["prompt_embeds"][halves]
    out["add_text_embeds"] = kw["add_text_embeds"][halves]
    # Every row of add_time_ids is the same (one size per batch); keep as many as there are inputs.
    out["add_time_ids"] = kw["add_time_ids"][: len(halves)]
    return out


class _Rows:
    """The image rows of one batch while it runs: which member owns each row, its generator, and
    which members are still wanted. The pipeline's step callbacks read and shrink it."""

    def __init__(self, members: list[Member], can_shrink: bool, clock: _Clock) -> None:
        self.members, self.can_shrink, self.clock = members, can_shrink, clock
        self.on_shrink: Callable[[], None] = lambda: None
        self.owner: list[int] = []  # member index of each image row
        self.prompts: list[str] = []
        self.negatives: list[str] = []
        self.generators: list = []
        for mi, m in enumerate(members):
            for seed in m.params.seeds:
                self.owner.append(mi)
                self.prompts.append(m.params.prompt)
                self.negatives.append(m.params.negative_prompt or "")
                self.generators.append(torch.Generator(clock.device).manual_seed(seed))
        self.alive = [not m.is_cancelled() for m in members]
        self.cancelled_at: list[int | None] = [None if a else 0 for a in self.alive]
        self.step_marks: list[tuple] = []  # (start, end) of each step, as _Clock marks
        self.marks: dict[str, Any] = {}
        self.preview_map = None  # vqdm.models.preview.LatentPreview when a member wants partial images
        self.clean_latents = None  # the sampler's clean-latent estimate at the last step, when captured
        self.preview_at: list[list[int]] | None = None  # per member: the steps after which it gets a preview

    def notice_cancelled(self, step: int) -> None:
        for mi, m in enumerate(self.members):
            if self.alive[mi] and m.is_cancelled():
                self.alive[mi], self.cancelled_at[mi] = False, step

    def wanted(self) -> list[int]:
        return [r for r, mi in enumerate(self.owner) if self.alive[mi]]

    def step_started(self, _module, _args) -> None:
        """U-Net forward pre-hook: the first call ends text encoding; each call starts a step."""
        self.marks["step"] = mark = self.clock.mark()
        self.marks.setdefault("first_step", mark)

    def step_ended(self, p, i: int, _t, kw: dict) -> dict:
        """diffusers' `callback_on_step_end`: progress, cancellation, and the batch shrunk to the rows
        still wanted where the sampler allows."""
        self.step_marks.append((self.marks["step"], self.clock.mark()))
        self.notice_cancelled(i + 1)
        if not any(self.alive):
            p._interrupt = True  # diffusers' documented way to stop the loop
            return {}
        for mi, m in enumerate(self.members):
            if self.alive[mi]:
                m.on_step(i + 1, p.num_timesteps)
        if self.preview_map is not None:
            self.send_previews(i + 1, p.num_timesteps)
        keep = self.wanted()
        if len(keep) == len(self.owner) or not self.can_shrink:
            return {}
        self.owner[:] = [self.owner[r] for r in keep]
        # The pipeline hands this same list object to every scheduler.step: edit it in place.
        self.generators[:] = [self.generators[r] for r in keep]
        self.on_shrink()
        return _shrink(kw, keep, p.do_classifier_free_guidance)

    def capture_clean_latents(self, scheduler) -> None:
        """Wrap this batch's scheduler instance's `step` (a fresh instance per batch, so the wrapper
        goes with it) to keep each step's clean-latent estimate, which the pipeline drops."""
        step = scheduler.step

        def step_keeping_estimate(*args, return_dict: bool = True, **kwargs):
            out = step(*args, return_dict=True, **kwargs)
            self.clean_latents = clean_estimate(scheduler, out)
            if self.clean_latents is None:  # a solver without one: the current latents, noise and all
                self.clean_latents = out.prev_sample
            return out if return_dict else out.to_tuple()

        scheduler.step = step_keeping_estimate

    def send_previews(self, step: int, total: int) -> None:
        """After step `step` of `total`: a preview of each image of every live member due one now."""
        if self.preview_at is None:  # an edit runs int(steps x strength) steps: known once it runs
            self.preview_at = [preview_steps(total, m.params.partial_images) if m.wants_previews else []
                               for m in self.members]
        due = [mi for mi in range(len(self.members)) if self.alive[mi] and step in self.preview_at[mi]]
        if not due or self.clean_latents is None:
            return
        rows = [r for r, mi in enumerate(self.owner) if mi in due]
        pixels = preview_rgb(self.clean_latents[rows], self.preview_map).numpy()
        image_index = {mi: 0 for mi in due}
        for r, rgb in zip(rows, pixels):
            mi = self.owner[r]
            m = self.members[mi]
            preview = Image.fromarray(rgb)  # at the output size: latents are (height / f) x (width / f)
            if m.params.edit is not None:
                preview = paste_back(preview, m.params.edit)
            (preview,) = resized([preview], m.params.resize_to)  # at the size asked, as the final image
            m.on_preview(image_index[mi], self.preview_at[mi].index(step), preview)
            image_index[mi] += 1

    def images_per_member(self, images: list, wanted: list[int]) -> list[list[Any] | None]:
        out: list[list[Any] | None] = [None] * len(self.members)
        for image, r in zip(images, wanted):
            mi = self.owner[r]
            if out[mi] is None:
                out[mi] = []
            out[mi].append(image)
        return out


def run_batch(replica: "Replica", members: list[Member]) -> BatchOutcome:
    """Generate every member's images in one pipeline call. Members must share `batch_key()`."""
    first = members[0].params
    keys = {m.params.batch_key() for m in members}
    if len(keys) != 1:
        raise ValueError(f"members of one batch must share size, steps, guidance and scheduler (got {len(keys)} kinds)")
    pipe = replica.pipe
    sampler = samplers.resolve(first.scheduler, replica.scheduler_class)
    with swapped_scheduler(pipe, sampler.class_name, replica.scheduler_config):
        # Edit pipelines keep per-row image latents and masks outside the callback's reach: no shrinking.
        rows = _Rows(members, sampler.stateless and first.edit is None, _Clock(replica.device))
        out = _generate(replica, first, rows)
    # Members asked for another size than the model drew (size policy nearest): resized here, in the worker.
    out.images = [None if images is None else resized(images, m.params.resize_to)
                  for images, m in zip(out.images, members)]
    out.revised_prompts = [revised_prompt(pipe.tokenizer, m.params.prompt) if rows.alive[mi] else None
                           for mi, m in enumerate(members)]
    out.prompt_tokens = [prompt_tokens(pipe.tokenizer, m.params.prompt) for m in members]
    return out


def _generate(replica: "Replica", first: GenerationParams, rows: _Rows) -> BatchOutcome:
    """The pipeline call to latents, then the VAE decode of the rows still wanted, timed apart."""
    pipe, cache, clock = replica.pipe, replica.weight_cache, rows.clock
    n_rows = len(rows.owner)
    decode_before = cache.stats()["decode_seconds"] if cache is not None else 0.0
    compiled = replica.compiled
    if any(m.wants_previews for m in rows.members):
        if replica.latent_preview is None:
            replica.latent_preview = fit_latent_preview(pipe)
        rows.preview_map = replica.latent_preview
        rows.capture_clean_latents(pipe.scheduler)
    hook = pipe.unet.register_forward_pre_hook(rows.step_started)
    t0 = clock.mark()
    try:
        with torch.inference_mode(), (cache.request() if cache is not None else contextlib.nullcontext()), \
                (replica.loras.activate(first.loras) if first.loras else contextlib.nullcontext()), \
                (compiled.batch(batch_fallback(first.loras)) if compiled is not None
                 else contextlib.nullcontext()) as compiled_batch:
            if compiled_batch is not None:
                rows.on_shrink = compiled_batch.shrunk
            call = dict(
                prompt=rows.prompts, negative_prompt=rows.negatives if first.negative_prompt is not None else None,
                height=first.height, width=first.width, num_inference_steps=first.steps,
                guidance_scale=first.guidance, generator=rows.generators, output_type="latent",
                callback_on_step_end=rows.step_ended, callback_on_step_end_tensor_inputs=_STEP_TENSORS,
            )
            call_pipe = pipe
            if first.edit is not None:  # img2img / inpainting on the same components (vqdm.server.edits)
                call_pipe, call = edit_call(pipe, call, [rows.members[mi].params.edit for mi in rows.owner])
            latents = call_pipe(**call).images
            t_denoised = clock.mark()
            rows.notice_cancelled(first.steps)  # cancelled during the last step
            wanted = rows.wanted()
            images = decode_latents(pipe, latents[wanted]) if wanted else []
            if first.edit is not None:
                images = [paste_back(im, rows.members[rows.owner[r]].params.edit) for im, r in zip(images, wanted)]
            t_decoded = clock.mark()
    finally:
        hook.remove()
    first_step = rows.marks.get("first_step", t_denoised)
    seconds = clock.seconds
    return BatchOutcome(
        images=rows.images_per_member(images, wanted), revised_prompts=[None] * len(rows.members),
        cancelled_at_step=rows.cancelled_at, rows=n_rows, latent_cells=latents.shape[-2] * latents.shape[-1],
        step_seconds=[seconds(a, b) for a, b in rows.step_marks],
        text_encode_s=seconds(t0, first_step), denoise_s=seconds(first_step, t_denoised),
        vae_decode_s=seconds(t_denoised, t_decoded),
        weight_decode_s=cache.stats()["decode_seconds"] - decode_before if cache is not None else None,
        total_s=seconds(t0, t_decoded), compile_mode=compiled.mode if compiled is not None else None,
        compiled_steps=dict(compiled_batch.counts) if compiled_batch is not None else {})
