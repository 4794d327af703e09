"""Global teacher–student distillation of a quantized U-Net (SPEC §4).

Teacher = the original dense U-Net, student = the VQ U-Net of an artifact. In each round, fresh
prompts are sampled with the teacher (calibration's sampling loop: SDXL with DDIM and CFG, both
halves; Turbo with its own scheduler, 1–4 steps, no CFG); every U-Net call becomes a sample
(x_t, t, conditioning, teacher output). The student is trained on MSE(student(x_t), teacher(x_t))
with Adam, gradient accumulation to the effective batch, bf16 autocast on CUDA and gradient
checkpointing. Trainable: codebooks, scales and every other U-Net parameter, in fp32 master
copies; codes are buffers and never change, so the output artifact has the input's size.

Weight gradients (`weight_grad`):
    dense     each VQ layer's weight is decoded once per optimizer step into a dense fp32 leaf;
              micro-batches accumulate dL/dW there, and one backward through the decode per step
              carries it to codebooks and scales (the gather's scatter-add runs once per step,
              not once per micro-batch). Costs 8 bytes per weight (21 GB for SDXL).
    per-call  the kernels' differentiable reference path decodes inside every forward (least
              memory; the scatter-add runs every micro-batch). Same gradients, tested.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from vqdm.errors import ConfigError, ModelFolderError, VQDMError
from vqdm.kernels import dequantize
from vqdm.kernels.decoded import conv_weight_view
from vqdm.models import VQConv2d, detect_family, load_pipeline, read_model_index, vq_modules
from vqdm.quantizer.distill.checkpoint import DistillCheckpoint
from vqdm.quantizer.sampling import (Batch, CalibrationConfig, load_prompts, plan_batches, prompt_seed,
                                         prompts_digest)
from vqdm.quantizer.unet_samples import SampleBank, record_trajectories, unet_predictions

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")
WEIGHT_GRADS = ("dense", "per-call")
# Text-side components whose outputs the samples carry: the student's must be the teacher's.
SHARED_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


class DistillStopped(VQDMError):
    """The run stopped after a checkpoint because it was asked to (tests); --resume continues it."""


@dataclass
class DistillConfig:
    """One distillation run. Presets hold the SPEC §4 recipe; the CLI overrides fields."""

    num_prompts: int  # over all rounds; the prompt file is cycled with fresh seeds
    rounds: int
    steps: int  # teacher sampling steps (Turbo, vary_steps: batches cycle 1..steps)
    guidance: float
    resolution: int
    scheduler: str  # "ddim" (SDXL) or "native" (the folder's; Turbo)
    vary_steps: bool
    train_steps: int  # optimizer steps over all rounds
    batch_size: int  # samples per micro-batch (a sample: one prompt at one step, both CFG halves)
    grad_accum: int  # micro-batches per optimizer step
    lr: float = 1e-6
    beta1: float = 0.9
    beta2: float = 0.999
    seed: int = 0
    prompts_file: str | None = None
    gen_batch_size: int = 1  # prompts per teacher pipeline call
    heldout_prompts: int = 4  # teacher trajectories of unseen prompts/seeds, MSE before and after
    precision: str = "auto"  # autocast: "auto" = bf16 on CUDA when supported, else fp32
    gradient_checkpointing: bool = True
    weight_grad: str = "dense"
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        checks = [
            (self.num_prompts >= 1, f"--num-prompts must be at least 1, got {self.num_prompts}"),
            (self.rounds >= 1, f"--rounds must be at least 1, got {self.rounds}"),
            (self.steps >= 1, f"--steps must be at least 1, got {self.steps}"),
            (self.resolution >= 8 and self.resolution % 8 == 0,
             f"--resolution must be a positive multiple of 8, got {self.resolution}"),
            (self.train_steps >= self.rounds, f"--train-steps ({self.train_steps}) must be at least --rounds ({self.rounds})"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"Adam betas must lie in [0, 1), got {self.beta1}, {self.beta2}"),
            (self.gen_batch_size >= 1, f"--gen-batch-size must be at least 1, got {self.gen_batch_size}"),
            (self.heldout_prompts >= 0, f"--heldout-prompts must be >= 0, got {self.heldout_prompts}"),
            (self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.weight_grad in WEIGHT_GRADS, f"--weight-grad must be one of {WEIGHT_GRADS}, got {self.weight_grad!r}"),
            (self.checkpoint_every >= 1, f"--checkpoint-every must be at least 1, got {self.checkpoint_every}"),
            (math.ceil(self.num_prompts / self.gen_batch_size) >= self.rounds,
             f"{self.num_prompts} prompt(s) in batches of {self.gen_batch_size} cannot fill {self.rounds} rounds"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def replace(self, **overrides) -> "DistillConfig":
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def calibration(self) -> CalibrationConfig:
        """The sampling settings of the teacher trajectories, in calibration's terms."""
        return CalibrationConfig(num_prompts=self.num_prompts, steps=self.steps, guidance=self.guidance,
                                 resolution=self.resolution, scheduler=self.scheduler, vary_steps=self.vary_steps,
                                 batch_size=self.gen_batch_size, seed=self.seed, prompts_file=self.prompts_file)


# SPEC §4. SDXL: 4 rounds x 512 prompts, 50 DDIM steps, guidance 5, 1024², effective batch 64,
# 1,600 steps = 102,400 samples = every sample of the 4 rounds once. Turbo: no CFG, its own
# scheduler at 1-4 steps (2.5 on average): 10,240 prompts a round give the same 25,600 samples.
DISTILL_PRESETS: dict[str, DistillConfig] = {
    "sdxl": DistillConfig(num_prompts=2048, rounds=4, steps=50, guidance=5.0, resolution=1024, scheduler="ddim",
                          vary_steps=False, train_steps=1600, batch_size=4, grad_accum=16, gen_batch_size=2),
    "sdxl-turbo": DistillConfig(num_prompts=40_960, rounds=4, steps=4, guidance=0.0, resolution=512,
                                scheduler="native", vary_steps=True, train_steps=1600, batch_size=8, grad_accum=8,
                                gen_batch_size=8),
}


def distill_preset(family: str, **overrides) -> DistillConfig:
    try:
        base = DISTILL_PRESETS[family]
    except KeyError:
        raise ConfigError(f"unknown --preset {family!r}: choose {' or '.join(DISTILL_PRESETS)}") from None
    return base.replace(**overrides)


# -- the plan: rounds of prompts and of optimizer steps ------------------------------------------
def round_batches(cfg: DistillConfig, prompts: list[str]) -> list[list[Batch]]:
    """Teacher pipeline batches of each round: prompt i is prompts[i mod len] with seed (seed, i)."""
    batches = plan_batches(cfg.calibration(), prompts)
    nb = len(batches)
    return [batches[r * nb // cfg.rounds:(r + 1) * nb // cfg.rounds] for r in range(cfg.rounds)]


def round_steps(cfg: DistillConfig) -> list[tuple[int, int]]:
    """[first, end) optimizer steps of each round."""
    return [(r * cfg.train_steps // cfg.rounds, (r + 1) * cfg.train_steps // cfg.rounds) for r in range(cfg.rounds)]


def heldout_batches(cfg: DistillConfig, prompts: list[str]) -> list[Batch]:
    """Prompts num_prompts.. (never trained on: their seeds are new, their text too while the file lasts)."""
    out = []
    first = cfg.num_prompts
    for j, start in enumerate(range(0, cfg.heldout_prompts, cfg.gen_batch_size)):
        idx = range(first + start, first + min(cfg.heldout_prompts, start + cfg.gen_batch_size))
        steps = 1 + j % cfg.steps if cfg.vary_steps else cfg.steps
        out.append(Batch(10**9 + j, tuple(prompts[i % len(prompts)] for i in idx),
                         tuple(prompt_seed(cfg.seed, i) for i in idx), steps))
    return out


def sample_order(seed: int, round_index: int, num_samples: int, start: int, count: int) -> torch.Tensor:
    """Sample indices start..start+count of the round's stream: a fresh permutation every epoch."""
    from vqdm.quantizer.quantize.run import layer_seed

    out, pos = [], start
    while pos < start + count:
        epoch, within = divmod(pos, num_samples)
        gen = torch.Generator().manual_seed(layer_seed(seed, f"distill-order:{round_index}:{epoch}"))
        take = min(start + count - pos, num_samples - within)
        out.append(torch.randperm(num_samples, generator=gen)[within:within + take])
        pos += take
    return torch.cat(out)


# -- dense weight gradients --------------------------------------------------------------------
class DecodedWeights:
    """A `weight_cache` for VQ modules during training: the decoded weight as a dense fp32 leaf.

    Micro-batches accumulate dL/dW in the leaves; `push_gradients` carries them through one decode
    per layer to codebooks and scales, and `refresh` re-decodes after the optimizer step.
    """

    def __init__(self, unet: nn.Module) -> None:
        self.layers = [m for _, m in vq_modules(unet)]
        self.weights: dict[int, torch.Tensor] = {}
        for m in self.layers:
            self.weights[id(m)] = dequantize(m.codes, m.codebooks.detach(), m.scales.detach()).float().requires_grad_()

    @contextlib.contextmanager
    def installed(self):
        saved = [m.weight_cache for m in self.layers]
        for m in self.layers:
            m.weight_cache = self
        try:
            yield self
        finally:
            for m, cache in zip(self.layers, saved):
                m.weight_cache = cache

    def lookup(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w = self.weights[id(module)]  # [n, d]
        return conv_weight_view(w, module.in_channels, module.kernel_size) if isinstance(module, VQConv2d) else w

    def push_gradients(self) -> None:
        """dL/dW of every layer -> codebooks.grad, scales.grad (one layer's decode graph at a time)."""
        for m in self.layers:
            w = self.weights[id(m)]
            if w.grad is not None:
                torch.autograd.backward(dequantize(m.codes, m.codebooks, m.scales), w.grad)
                w.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        for m in self.layers:
            self.weights[id(m)].copy_(dequantize(m.codes, m.codebooks, m.scales))


# -- training ------------------------------------------------------------------------------------
def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_student(unet: nn.Module, cfg: DistillConfig) -> dict[str, nn.Parameter]:
    """Make every U-Net parameter a trainable fp32 master; return them by name (codes stay buffers)."""
    unet.float()
    params = dict(unet.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return params


def make_optimizer(params: dict[str, nn.Parameter], cfg: DistillConfig) -> torch.optim.Adam:
    return torch.optim.Adam(list(params.values()), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def accumulate_gradients(unet: nn.Module, bank: SampleBank, micro_batches: list[torch.Tensor], precision: str,
                         decoded: DecodedWeights | None = None) -> float:
    """Gradients of the mean MSE over `micro_batches` (sample indices) into the parameters' .grad."""
    device = next(unet.parameters()).device
    total = 0.0
    for idx in micro_batches:
        kwargs, target = bank.unet_inputs(idx, device, torch.float32)
        with autocast(precision, device):
            pred = unet(**kwargs, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target)
        (loss / len(micro_batches)).backward()
        total += loss.item()
    if decoded is not None:
        decoded.push_gradients()
    return total / len(micro_batches)


def train_step(unet: nn.Module, bank: SampleBank, micro_batches: list[torch.Tensor], optimizer: torch.optim.Optimizer,
               precision: str, decoded: DecodedWeights | None = None) -> float:
    """One optimizer step over `micro_batches`; returns the mean MSE."""
    loss = accumulate_gradients(unet, bank, micro_batches, precision, decoded)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if decoded is not None:
        decoded.refresh()
    return loss


def output_mse(unet: nn.Module, bank: SampleBank, batch_size: int = 8) -> float:
    """mean (unet(x_t) - recorded output)² over the bank: the student–teacher U-Net output MSE."""
    was_training = unet.training
    unet.eval()
    pred = unet_predictions(unet, bank, batch_size=batch_size, dtype=torch.float32)
    unet.train(was_training)
    return float(((pred - bank.target.float()) ** 2).mean())


def codes_snapshot(unet: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.codes.detach().clone() for n, m in vq_modules(unet)}


def check_codes_unchanged(unet: nn.Module, before: dict[str, torch.Tensor]) -> None:
    changed = [n for n, m in vq_modules(unet) if not torch.equal(m.codes, before[n])]
    if changed:
        raise RuntimeError(f"codes of {len(changed)} layer(s) changed during distillation (e.g. {changed[0]}): "
                           "codes must stay frozen")


# -- the command ---------------------------------------------------------------------------------
@dataclass
class DistillResult:
    out: Path
    loss_curve: list[float]
    heldout_mse_before: float | None
    heldout_mse_after: float | None
    seconds: float
    resumed_from_step: int | None


def _check_inputs(teacher: Path, student: Path, out: Path, ckpt: DistillCheckpoint, resume: bool, force: bool
                  ) -> dict:
    """Refuse wrong inputs and unsafe outputs before any work; return the student's manifest."""
    from vqdm.models.artifact import MANIFEST_FILE, read_manifest, sha256_file, unet_fingerprint

    if resume and force:
        raise ConfigError("--resume and --force exclude each other: resume a run, or start over")
    read_model_index(teacher)
    if (teacher / MANIFEST_FILE).is_file():
        raise ModelFolderError(f"--teacher {teacher} is a vqdm artifact: the teacher is the original dense folder")
    manifest = read_manifest(student)
    for path in (teacher, student):
        o, p = out.resolve(), path.resolve()
        if o == p or p in o.parents or o in p.parents:
            raise ConfigError(f"--out {out} overlaps {path}: choose another output folder")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (use --force to overwrite, or choose another --out)")
    if resume and not ckpt.exists():
        raise ConfigError(f"--resume: no checkpoint at {ckpt.path} (run without --resume to start)")
    if ckpt.exists() and not (resume or force):
        raise ConfigError(f"an interrupted run left a checkpoint at {ckpt.path}: pass --resume to continue it "
                          "or --force to start over")
    base = (manifest.get("base_model") or {}).get("unet_sha256")
    if base is None:
        log.warning("%s does not record its base U-Net; cannot check it was quantized from %s", student, teacher)
    elif base != unet_fingerprint(source_dir=teacher):
        raise ConfigError(f"--student {student} was quantized from another U-Net than --teacher {teacher} "
                          "(base_model.unet_sha256 differs): distill against the folder it was quantized from")
    files = manifest["files"]
    for comp in SHARED_COMPONENTS:
        for f in sorted((teacher / comp).rglob("*")):
            rel = str(f.relative_to(teacher))
            if f.is_file() and rel in files and files[rel] != sha256_file(f):
                raise ConfigError(f"{student}/{rel} differs from the teacher's {rel}: student and teacher must use "
                                  "the same text encoders and tokenizers")
    return manifest


def _layer_stats(manifest: dict) -> dict[str, dict]:
    """The student's per-layer entries, as save_artifact takes them (it recomputes the shape keys)."""
    return {e["name"]: {k: v for k, v in e.items() if k not in ("name", "type", "n", "d", "bits")}
            for e in manifest["layers"]}


def distill(teacher: str | Path, student: str | Path, out: str | Path, cfg: DistillConfig | None = None, *,
            device: str | None = None, teacher_dtype: torch.dtype | None = None, resume: bool = False,
            force: bool = False, stop_after_step: int | None = None, progress: bool = True) -> DistillResult:
    """Distill the VQ U-Net of artifact `student` toward the dense U-Net of folder `teacher`; write `out`.

    `cfg` defaults to the preset of the teacher's family. The output artifact has the student's
    codes, the trained codebooks / scales / other parameters (fp16 at rest), the teacher's
    non-U-Net components, and the student's manifest plus a "distillation" section (settings,
    loss curve, held-out MSE). `stop_after_step` checkpoints and raises DistillStopped there.
    """
    from vqdm.models.artifact import WEIGHTS_FILE, load_vq_unet, save_artifact, unet_fingerprint

    start = time.perf_counter()
    teacher, student, out = Path(teacher), Path(student), Path(out)
    ckpt = DistillCheckpoint.for_output(out)
    manifest = _check_inputs(teacher, student, out, ckpt, resume, force)
    family = detect_family(teacher)
    cfg = cfg or distill_preset(family)
    prompts = load_prompts(cfg.prompts_file)

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(cfg.precision, dev)
    tdtype = teacher_dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    pipe = load_pipeline(teacher, dtype=tdtype, device=str(dev))
    unet, _ = load_vq_unet(student, dtype=torch.float32, device=dev)
    if _public(unet.config) != _public(pipe.unet.config):
        raise ConfigError(f"--student {student} and --teacher {teacher} have different U-Net configs")
    codes_before = codes_snapshot(unet)

    identity = json_normalise({
        "teacher_unet_sha256": unet_fingerprint(source_dir=teacher),
        "student_weights_sha256": manifest["files"][WEIGHTS_FILE],
        "config": {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"},
        "prompts_sha256": prompts_digest(prompts),
    })
    params = prepare_student(unet, cfg)
    optimizer = make_optimizer(params, cfg)
    loss_curve: list[float] = []
    step, resumed_from, extra = 0, None, {}
    if resume:
        state = ckpt.load(identity)
        ckpt.restore(state, params, optimizer)
        step, loss_curve, extra = state["step"], list(state["loss_curve"]), dict(state["extra"])
        resumed_from = step
        log.info("resuming %s at step %d of %d from %s", out, step, cfg.train_steps, ckpt.path)
    elif force:
        ckpt.remove()

    seconds = {"trajectories": extra.get("trajectory_seconds", 0.0), "training": extra.get("training_seconds", 0.0)}
    hold = heldout_batches(cfg, prompts)
    heldout_bank = None
    if hold:
        t0 = time.perf_counter()
        heldout_bank = record_trajectories(pipe, cfg.calibration(), hold)
        seconds["trajectories"] += time.perf_counter() - t0
        if "heldout_mse_before" not in extra:
            extra["heldout_mse_before"] = output_mse(unet, heldout_bank, cfg.batch_size)
            log.info("held-out student-teacher MSE before: %.6g", extra["heldout_mse_before"])

    rounds, spans = round_batches(cfg, prompts), round_steps(cfg)
    samples_per_round: list[int] = list(extra.get("samples_per_round", []))
    decoded = DecodedWeights(unet) if cfg.weight_grad == "dense" else None
    bar = tqdm(total=cfg.train_steps, initial=step, desc="distill", unit="step", disable=not progress)

    def save_checkpoint() -> None:
        extra.update(trajectory_seconds=seconds["trajectories"], training_seconds=seconds["training"],
                     samples_per_round=samples_per_round)
        ckpt.save(identity, step, loss_curve, params, optimizer, extra)

    with decoded.installed() if decoded is not None else contextlib.nullcontext():
        for r, (first, end) in enumerate(spans):
            if step >= end:
                continue
            t0 = time.perf_counter()
            with tqdm(total=len(rounds[r]), desc=f"round {r + 1}/{cfg.rounds} teacher", unit="batch", leave=False,
                      disable=not progress) as tbar:
                bank = record_trajectories(pipe, cfg.calibration(), rounds[r], progress=tbar)
            seconds["trajectories"] += time.perf_counter() - t0
            if len(samples_per_round) <= r:
                samples_per_round.append(len(bank))
            log.info("round %d/%d: %d samples (%.2f GB) from %d prompts", r + 1, cfg.rounds, len(bank),
                     bank.nbytes() / 1e9, sum(len(b.prompts) for b in rounds[r]))
            t0 = time.perf_counter()
            while step < end:
                order = sample_order(cfg.seed, r, len(bank), (step - first) * cfg.effective_batch, cfg.effective_batch)
                loss = train_step(unet, bank, list(order.split(cfg.batch_size)), optimizer, precision, decoded)
                loss_curve.append(loss)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}", round=r + 1)
                if step % cfg.checkpoint_every == 0 or step == end or step == stop_after_step:
                    seconds["training"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    save_checkpoint()
                if stop_after_step is not None and step >= stop_after_step:
                    bar.close()
                    raise DistillStopped(f"stopped after step {step} as asked; continue with --resume "
                                         f"(checkpoint {ckpt.path})")
            seconds["training"] += time.perf_counter() - t0
            del bank
    bar.close()

    check_codes_unchanged(unet, codes_before)
    if heldout_bank is not None:
        extra["heldout_mse_after"] = output_mse(unet, heldout_bank, cfg.batch_size)
        log.info("held-out student-teacher MSE: %.6g -> %.6g", extra["heldout_mse_before"], extra["heldout_mse_after"])
    unet.disable_gradient_checkpointing()
    unet.eval().requires_grad_(False)

    distillation = {
        "method": "MSE between student and teacher U-Net outputs on teacher trajectories (SPEC 4)",
        "teacher": {"name": teacher.resolve().name, "family": family, "unet_sha256": identity["teacher_unet_sha256"]},
        "student": {"name": student.resolve().name, "weights_sha256": identity["student_weights_sha256"]},
        **cfg.to_dict(),
        "effective_batch": cfg.effective_batch,
        "optimizer": {"name": "Adam", "lr": cfg.lr, "betas": [cfg.beta1, cfg.beta2]},
        "precision": precision, "device": str(dev), "teacher_dtype": str(tdtype).replace("torch.", ""),
        "scheduler_name": "DDIMScheduler" if cfg.scheduler == "ddim" else type(pipe.scheduler).__name__,
        "prompts_sha256": identity["prompts_sha256"], "prompt_lines": len(prompts),
        "samples_per_round": samples_per_round,
        "trainable_parameters": sum(p.numel() for p in params.values()),
        "trainable": "codebooks, scales and every non-quantized U-Net parameter (codes frozen)",
        "loss_curve": loss_curve,
        "loss_first": loss_curve[0] if loss_curve else None, "loss_last": loss_curve[-1] if loss_curve else None,
        "heldout": {"prompts": cfg.heldout_prompts, "mse_before": extra.get("heldout_mse_before"),
                    "mse_after": extra.get("heldout_mse_after")},
        "resumed_from_step": resumed_from,
        "seconds": {**seconds, "total_this_process": time.perf_counter() - start},
    }
    fields = {
        "quantization": manifest["quantization"], "layers": _layer_stats(manifest),
        "base_model": manifest.get("base_model", {}), "calibration": manifest.get("calibration"),
        "distillation": distillation,
    }
    # save_artifact reads only `.unet` when the components are copied from source_dir (the teacher's).
    save_artifact(SimpleNamespace(unet=unet), out, fields, source_dir=teacher, overwrite=force)
    ckpt.remove()
    return DistillResult(out, loss_curve, extra.get("heldout_mse_before"), extra.get("heldout_mse_after"),
                         time.perf_counter() - start, resumed_from)


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def json_normalise(obj: dict) -> dict:
    # What the checkpoint compares must survive a JSON round trip unchanged (tuples -> lists).
    import json

    return json.loads(json.dumps(obj))
