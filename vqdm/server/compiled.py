"""Compiled serving: each replica's U-Net compiled at start-up for a few static shapes (buckets),
the eager U-Net kept for every other call, and every denoising step counted by which one ran.

`CompiledUNet` is installed as the U-Net module's `forward`, so the pipeline, diffusers' reads of
`pipe.unet.config`, and the forward pre-hooks on `pipe.unet` (the runner's step timer, the
watchdog) see the same module as before; only the body of each call changes. A call runs the
compiled graph when the batch allows it and its inputs have a compiled shape; otherwise it runs
eagerly and counts why (metric `vqdm_compiled_steps_total{mode,fallback}`, the reasons listed in
`vqdm.server.metrics.COMPILE_FALLBACKS`):

    lora    an adapter set is active (its branches are Python hooks the graphs were not traced with)
    cache   a weight-cache policy (request, budget=...) looks up decoded weights in Python each call
    shrink  a cancelled row shrank the batch: the rest of that batch runs eagerly
    shape   rows, size, dtype or arguments the graphs were not compiled for
    error   the compiled call refused to run (a guard that would recompile): eager from then on for
            that shape, with a warning in the log

After start-up nothing compiles: a call that would recompile fails fast under torch's
`fail_on_recompile` stance and runs eagerly instead (`error`), so no request pays for a compile.
Torch does not guard on module hooks: a hook added to a U-Net submodule after start-up is not seen
by the graphs. The LoRA runtime's hooks are attached before warm-up, and its batches run eagerly.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch

from vqdm.models.compile import allow_graphs, compile_unet, is_recompile_refused
from vqdm.models.weight_cache import compile_blocker

if TYPE_CHECKING:
    from vqdm.server.loader import Replica, ServedModel
    from vqdm.server.settings import Settings

log = logging.getLogger("vqdm.server")

# What `--compile auto` compiles, measured with `benchmarks/bench_unet.py --compile default` (3-bit,
# 2-core EPYC, quiet; step time compiled / eager):
# - cpu: only fp32 buckets of at least SDXL's 1024² with guidance (2 rows of 1024²), the one case
#   where the compiled U-Net ran faster: VQ 0.94x, dense 0.88x, after ~206 s of compile per shape
#   (benchmarks/results/bench_unet_compile_cpu_sdxl_1024.json). In bf16 at that size the compiled
#   VQ step was 1.08x the eager one, and at Turbo's 512², batch 1, 1.03x (fp32) and 1.00x (bf16)
#   (bench_unet_compile_cpu_turbo_512.json): those run eagerly.
# - cuda: every bucket, with CUDA graphs (reduce-overhead), the mode `benchmarks/run_gpu.sh`
#   measures as gpu_summary.json's served_speedup_vs_eager (not yet measured).
AUTO_MODE = {"cpu": "default", "cuda": "reduce-overhead"}
CPU_AUTO_MIN_ROW_PIXELS = 2 * 1024 * 1024
_SHAPE_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*$")


@dataclass(frozen=True)
class Bucket:
    """One static shape to compile: U-Net input rows (images, doubled under classifier-free
    guidance) at width x height pixels."""

    rows: int
    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.rows}x{self.width}x{self.height}"


def parse_bucket(text: str) -> Bucket:
    """'ROWSxWIDTHxHEIGHT', e.g. '2x1024x1024' (one image with CFG at 1024²)."""
    m = _SHAPE_RE.match(text)
    if not m:
        raise ValueError(f"compile shape {text!r}: write ROWSxWIDTHxHEIGHT, e.g. 2x1024x1024 (one image with "
                         "guidance at 1024²: rows count both CFG halves)")
    rows, width, height = (int(g) for g in m.groups())
    if rows < 1 or width < 8 or height < 8 or width % 8 or height % 8:
        raise ValueError(f"compile shape {text!r}: rows >= 1, width and height multiples of 8")
    return Bucket(rows, width, height)


def resolve_mode(setting: str, device: str) -> str:
    """The compile mode a device runs: the setting, or `auto`'s choice for the device type."""
    return AUTO_MODE.get(torch.device(device).type, "off") if setting == "auto" else setting


def compile_plan(setting: str, device: str, dtype: torch.dtype, buckets: list[Bucket]) -> tuple[str, list[Bucket]]:
    """(mode, the buckets to compile) on one device: every bucket for an explicit mode; for `auto`,
    only the buckets where compiling measured faster on that device type (AUTO_MODE's note)."""
    mode = resolve_mode(setting, device)
    if setting != "auto" or torch.device(device).type != "cpu":
        return mode, buckets if mode != "off" else []
    chosen = [b for b in buckets if dtype == torch.float32 and b.rows * b.width * b.height >= CPU_AUTO_MIN_ROW_PIXELS]
    return (mode, chosen) if chosen else ("off", [])


def buckets_for(settings: "Settings", model: "ServedModel") -> list[Bucket]:
    """The configured shapes, or the model's own size at 1..max_batch_size images, with the rows
    its default guidance sends (CFG doubles them: SDXL's 5.0 does, Turbo's 0.0 does not)."""
    if settings.compile_shapes:
        return list(dict.fromkeys(parse_bucket(s) for s in settings.compile_shapes))
    cfg = 2 if model.default_guidance > 1 else 1
    return [Bucket(n * cfg, model.default_width, model.default_height) for n in range(1, settings.max_batch_size + 1)]


def _inputs_key(sample, timestep, kwargs: dict) -> tuple | None:
    """What a compiled graph is specialised to, or None for arguments no graph takes."""
    added = kwargs.get("added_cond_kwargs")
    extra = {k: v for k, v in kwargs.items() if k not in ("added_cond_kwargs", "return_dict", "encoder_hidden_states")}
    if (any(v is not None for v in extra.values()) or kwargs.get("return_dict", True)
            or not isinstance(added, dict) or set(added) != {"text_embeds", "time_ids"}):
        return None
    if not (isinstance(timestep, torch.Tensor) and timestep.ndim == 0 or isinstance(timestep, (int, float))):
        return None
    ehs = kwargs["encoder_hidden_states"]
    return (tuple(sample.shape), sample.dtype, tuple(ehs.shape), tuple(added["text_embeds"].shape),
            tuple(added["time_ids"].shape))


class _Batch:
    """One batch's view: why it cannot use the graphs (None: it can, shape permitting) and what ran."""

    def __init__(self, reason: str | None) -> None:
        self.reason = reason
        self.counts: collections.Counter[str] = collections.Counter()

    def shrunk(self) -> None:
        self.reason = self.reason or "shrink"


class CompiledUNet:
    """A U-Net's compiled graphs (none when `skipped` names why) and the per-call choice between
    them and the eager forward. One batch at a time, like the replica it belongs to."""

    def __init__(self, unet: torch.nn.Module, mode: str, backend: str, skipped: str | None = None) -> None:
        self.unet, self.mode, self.skipped = unet, mode, skipped
        self.eager = type(unet).forward.__get__(unet)
        self.fn = None if skipped else compile_unet(unet, mode, backend)
        self.device = next(unet.parameters()).device
        # CUDA graphs replay into buffers the next replay overwrites: mark each step, copy the output.
        self.cuda_graphs = self.device.type == "cuda" and backend == "inductor" and mode != "default"
        self.blocker: str | None = None  # why nothing was compiled, in words (with `skipped`)
        self.compiled: set[tuple] = set()
        self.refused: set[tuple] = set()
        self._batch: _Batch | None = None
        unet.forward = self._forward  # instance attribute: module hooks still run around it

    def remove(self) -> None:
        """The eager U-Net back as it was."""
        self.unet.__dict__.pop("forward", None)

    # -- start-up ---------------------------------------------------------------------------------
    def compile_bucket(self, pipe, bucket: Bucket) -> bool:
        """Compile the graph for `bucket` on inputs shaped as the pipeline sends them, run it until it
        settles, then check that a call as served runs it without recompiling. False (logged, and
        the shape served eagerly, counted as `error`) when it does not: a first call that changed
        state the graph was traced on (a buffer cache in Python, say) recompiles once here, but a
        graph whose guards fail on every call can never serve."""
        f = pipe.vae_scale_factor
        if bucket.width % f or bucket.height % f:
            raise ValueError(f"compile shape {bucket}: width and height must be multiples of {f}")
        unet, r = self.unet, bucket.rows
        like = {"dtype": unet.dtype, "device": self.device}
        with torch.inference_mode():  # inference tensors, as in every served call: the guards check it
            sample = torch.randn(r, unet.config.in_channels, bucket.height // f, bucket.width // f, **like)
            kwargs = {
                "encoder_hidden_states": torch.randn(r, pipe.tokenizer.model_max_length,
                                                     unet.config.cross_attention_dim, **like),
                "added_cond_kwargs": {"text_embeds": torch.randn(r, pipe.text_encoder_2.config.projection_dim, **like),
                                      "time_ids": torch.randn(r, 6, **like)},
                "return_dict": False}
            t = torch.tensor(999.0, device=self.device)
            # CUDA-graph trees run a graph's first call eagerly, record the second and replay from
            # the third: all here, so that no request pays for a recording either.
            for _ in range(3 if self.cuda_graphs else 2):
                self._run(sample, t, kwargs)
            key = _inputs_key(sample, t, kwargs)
            self.compiled.add(key)
            return self._run_refusable(key, sample, t, kwargs) is not None

    # -- serving ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def batch(self, reason: str | None) -> Iterator[_Batch]:
        """The scope of one batch; `reason` is why none of its calls may use the graphs, if any."""
        self._batch = _Batch(self.skipped or reason)
        try:
            yield self._batch
        finally:
            self._batch = None

    def _run(self, sample, timestep, kwargs: dict):
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        added = kwargs["added_cond_kwargs"]
        out = self.fn(sample.contiguous(), torch.as_tensor(timestep, dtype=torch.float32, device=sample.device),
                      kwargs["encoder_hidden_states"].contiguous(),
                      added_cond_kwargs={k: added[k].contiguous() for k in ("text_embeds", "time_ids")},
                      return_dict=False)
        return (out[0].clone(),) if self.cuda_graphs else out

    def _forward(self, sample, timestep, encoder_hidden_states=None, *args, **kwargs):
        batch = self._batch
        if batch is None or args:  # outside a served batch (or called positionally): the plain eager U-Net
            return self.eager(sample, timestep, encoder_hidden_states, *args, **kwargs)
        kwargs["encoder_hidden_states"] = encoder_hidden_states
        reason = batch.reason
        if reason is None:
            key = _inputs_key(sample, timestep, kwargs)
            reason = "shape" if key not in self.compiled else "error" if key in self.refused else None
        if reason is None:
            out = self._run_refusable(key, sample, timestep, kwargs)
            if out is not None:
                batch.counts["none"] += 1
                return out
            reason = "error"
        batch.counts[reason] += 1
        return self.eager(sample, timestep, **kwargs)

    def _run_refusable(self, key: tuple, sample, timestep, kwargs: dict):
        """The compiled graph's output, or None (and `key` refused from now on) if it would recompile."""
        try:
            # The stance is process-wide; every worker sets the same one around its calls, and
            # nothing compiles once the workers have started (warm-up comes first).
            with torch.compiler.set_stance("fail_on_recompile"):
                return self._run(sample, timestep, kwargs)
        except Exception as e:
            if not is_recompile_refused(e):
                raise
            why = str(e)[:2000]
        self.refused.add(key)
        log.warning("compiled U-Net refused shape %s (%s); that shape runs eagerly from now on",
                    tuple(sample.shape), why)
        return None


def batch_fallback(loras: Any) -> str | None:
    """Why a whole batch runs eagerly, before any shape is looked at (a replica that could not
    compile at all says so itself: `CompiledUNet.skipped`)."""
    return "lora" if loras else None


def compile_replica(replica: "Replica", mode: str, backend: str, buckets: list[Bucket]) -> CompiledUNet:
    """Compile the replica's U-Net for every bucket (in the device's thread: CUDA graphs belong to
    the thread that records them) and install it; skipped, with every step then counted as a
    `cache` fallback, when its weight-cache policy needs host logic (`compile_blocker`)."""
    if replica.compiled is not None:
        replica.compiled.remove()
    blocker = compile_blocker(replica.pipe.unet)
    compiled = CompiledUNet(replica.pipe.unet, mode, backend, "cache" if blocker else None)
    compiled.blocker = blocker
    replica.compiled = compiled
    if not blocker:
        allow_graphs(2 * len(buckets))  # a bucket may recompile once while it settles
        for bucket in buckets:
            compiled.compile_bucket(replica.pipe, bucket)
    return compiled

