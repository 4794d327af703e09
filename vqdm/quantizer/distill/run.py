"""Global teacher–student distillation of a quantized U-Net (SPEC §4).

Teacher = the original dense U-Net, student = the VQ U-Net of an artifact. In each round, fresh
prompts are sampled with the teacher (calibration's sampling loop: SDXL with DDIM and CFG, both
halves; Turbo with its own scheduler, 1–4 steps, no CFG); every U-Net call becomes a sample
(x_t, t, conditioning, teacher output). The student is trained on MSE(student(x_t), teacher(x_t))
with Adam, gradient accumulation to the effective batch, bf16 autocast on CUDA and gradient
checkpointing. Trainable: codebooks, scales and every other U-Net parameter, in fp32 master
copies; codes are buffers and never change (unless PV-tuning is on, `pv_every`: then they are
re-chosen every few steps, vqdm/quantizer/distill/pv_tuning.py), so the output artifact has the input's size.

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
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from vqdm.errors import ConfigError, VQDMError
from vqdm.models import SingleFileOptions, base_unet_sha256, detect_family, load_pipeline, vq_modules
from vqdm.models.artifact import WEIGHTS_FILE, components_dir, load_vq_unet, save_artifact
from vqdm.quantizer.checkpoint import json_normalise
from vqdm.quantizer.distill import engine
from vqdm.quantizer.distill.checkpoint import DistillCheckpoint
from vqdm.quantizer.distill.checks import check_inputs
from vqdm.quantizer.distill.config import DistillConfig
from vqdm.quantizer.distill.decoded_weights import DecodedWeights
from vqdm.quantizer.distill.pv_tuning import PVTuner, codes_state
from vqdm.quantizer.distill.recipes import detect_recipe
from vqdm.quantizer.runtime import default_device, default_dtype
from vqdm.quantizer.sampling import Batch, load_prompts, named_seed, plan_batches, prompt_seed, prompts_digest
from vqdm.quantizer.unet_samples import SampleBank, record_trajectories, unet_predictions

log = logging.getLogger(__name__)



class DistillStopped(VQDMError):
    """The run stopped after a checkpoint because it was asked to (tests); --resume continues it."""


class DistillNotBetter(VQDMError):
    """No trained student beat the input on validation; nothing was written (see --allow-worse)."""


# -- the plan: rounds of prompts and of optimizer steps ------------------------------------------
def training_texts(cfg: DistillConfig, prompts: list[str]) -> list[str]:
    """Text of trajectory j: prompt j // S of the run (S = seeds per prompt), cycling the prompt file."""
    per = cfg.trajectories_per_prompt
    return [prompts[(j // per) % len(prompts)] for j in range(cfg.num_trajectories)]


def round_batches(cfg: DistillConfig, prompts: list[str]) -> list[list[Batch]]:
    """Teacher pipeline batches of each round: trajectory j is training_texts[j] with seed (seed, j)."""
    batches = plan_batches(cfg.sampling(), training_texts(cfg, prompts))
    nb = len(batches)
    return [batches[r * nb // cfg.rounds:(r + 1) * nb // cfg.rounds] for r in range(cfg.rounds)]


def round_steps(cfg: DistillConfig) -> list[tuple[int, int]]:
    """[first, end) optimizer steps of each round."""
    return [(r * cfg.train_steps // cfg.rounds, (r + 1) * cfg.train_steps // cfg.rounds) for r in range(cfg.rounds)]


def eval_batches(cfg: DistillConfig, prompts: list[str], split: str) -> list[Batch]:
    """The validation or test prompts: never trained on (their seeds are new, their text too while
    the file lasts). Validation is prompts num_prompts.. of the run, test the ones after it; their
    seeds follow the training trajectories'."""
    count = cfg.val_prompts if split == "val" else cfg.test_prompts
    t = cfg.teacher
    first = t.num_prompts + (0 if split == "val" else cfg.val_prompts)
    seed_shift = cfg.num_trajectories - t.num_prompts
    out = []
    for j, start in enumerate(range(0, count, t.batch_size)):
        idx = range(first + start, first + min(count, start + t.batch_size))
        steps = 1 + j % t.steps if t.vary_steps else t.steps
        out.append(Batch((10**9 if split == "val" else 2 * 10**9) + j, tuple(prompts[i % len(prompts)] for i in idx),
                         tuple(prompt_seed(t.seed, i + seed_shift) for i in idx), steps))
    return out


def sample_order(seed: int, round_index: int, num_samples: int, start: int, count: int) -> torch.Tensor:
    """Sample indices start..start+count of the round's stream: a fresh permutation every epoch."""
    out, pos = [], start
    while pos < start + count:
        epoch, within = divmod(pos, num_samples)
        gen = torch.Generator().manual_seed(named_seed(seed, f"distill-order:{round_index}:{epoch}"))
        take = min(start + count - pos, num_samples - within)
        out.append(torch.randperm(num_samples, generator=gen)[within:within + take])
        pos += take
    return torch.cat(out)


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
    return engine.make_optimizer(params, cfg.optim())


def accumulate_gradients(unet: nn.Module, bank: SampleBank, micro_batches: list[torch.Tensor], precision: str,
                         decoded: DecodedWeights | None = None, pv: PVTuner | None = None) -> float:
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
        if pv is not None:  # dL/dŴ of the whole step, before it is carried to codebooks and scales
            pv.accumulate(decoded.grads())
        decoded.push_gradients()
    return total / len(micro_batches)


def train_step(unet: nn.Module, bank: SampleBank, micro_batches: list[torch.Tensor], optimizer: torch.optim.Optimizer,
               precision: str, decoded: DecodedWeights | None, step: int, cfg: DistillConfig,
               pv: PVTuner | None = None) -> float:
    """Optimizer step `step` (0-based) over `micro_batches`; returns the mean MSE. With `pv`, the
    codes are updated after the step when due (PV-tuning)."""
    loss = accumulate_gradients(unet, bank, micro_batches, precision, decoded, pv)
    engine.optimizer_step(optimizer, step, cfg.train_steps, cfg.optim())
    if pv is not None:
        pv.step()
    if decoded is not None:
        decoded.refresh()
    return loss


@torch.no_grad()
def _eval_predictions(unet: nn.Module, bank: SampleBank, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(unet(x_t) in eval mode, recorded output), both fp32; the U-Net's train/eval mode is restored."""
    was_training = unet.training
    unet.eval()
    pred = unet_predictions(unet, bank, batch_size=batch_size, dtype=torch.float32)
    unet.train(was_training)
    return pred, bank.target.float()


def output_mse(unet: nn.Module, bank: SampleBank, batch_size: int = 8) -> float:
    """mean (unet(x_t) - recorded output)² over the bank: the student–teacher U-Net output MSE."""
    pred, target = _eval_predictions(unet, bank, batch_size)
    return float(((pred - target) ** 2).mean())


def relative_error(unet: nn.Module, bank: SampleBank, batch_size: int = 8) -> float:
    """Σ‖unet(x_t) − recorded‖² / Σ‖recorded‖² over the bank: `vqdm eval`'s unet_rel_mse on these samples."""
    pred, target = _eval_predictions(unet, bank, batch_size)
    return float(((pred - target) ** 2).sum() / (target ** 2).sum().clamp_min(1e-30))


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
    val_error_before: float
    val_error_after: float  # the selected student's
    test_error_before: float | None
    test_error_after: float | None
    best_step: int
    stopped_early: bool
    improved: bool  # the written student beats the input on validation
    seconds: float
    resumed_from_step: int | None
    lr_scale: float = 1.0  # the factor the learning rates were scaled by (engine.error_lr_scale)


def _layer_stats(manifest: dict) -> dict[str, dict]:
    """The student's per-layer entries, as save_artifact takes them (it recomputes the shape keys)."""
    return {e["name"]: {k: v for k, v in e.items() if k not in ("name", "type", "n", "d", "bits")}
            for e in manifest["layers"]}


@dataclass
class _Progress:
    """What a run has done so far; checkpointed, and restored by --resume."""

    step: int = 0
    loss_curve: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # test errors, seconds, samples per round, stopped_early
    resumed_from: int | None = None
    selection: engine.Selection | None = None  # validation history and the best student so far

    def seconds(self, kind: str) -> float:
        return self.extra.get(f"{kind}_seconds", 0.0)

    def add_seconds(self, kind: str, value: float) -> None:
        self.extra[f"{kind}_seconds"] = self.seconds(kind) + value


def distill(teacher: str | Path, student: str | Path, out: str | Path, cfg: DistillConfig | None = None, *,
            device: str | None = None, teacher_dtype: torch.dtype | None = None, resume: bool = False,
            force: bool = False, stop_after_step: int | None = None, progress: bool = True,
            single_file: SingleFileOptions | None = None) -> DistillResult:
    """Distill the VQ U-Net of artifact `student` toward the dense U-Net of folder (or single file: `single_file`)
    `teacher`; write `out`.

    `cfg` defaults to the recipe of the teacher's family. The student is validated every
    `cfg.validate_every` steps on unseen prompts/seeds; the best one is kept and training stops
    after `cfg.patience` validations without a new best. It is written only when it beats the
    input on validation (else DistillNotBetter, nothing written, unless `cfg.allow_worse`). The
    reported figures come from a separate test set. The output artifact has the student's codes,
    the trained codebooks / scales / other parameters (fp16 at rest), the teacher's non-U-Net
    components, and the student's manifest plus a "distillation" section. `stop_after_step`
    checkpoints and raises DistillStopped there.
    """
    start = time.perf_counter()
    teacher, student, out = Path(teacher), Path(student), Path(out)
    ckpt = DistillCheckpoint.for_output(out)
    manifest = check_inputs(teacher, student, out, ckpt, resume, force, single_file)
    family = detect_family(teacher, single_file)
    cfg = cfg or detect_recipe(teacher, family, single_file)
    prompts = load_prompts(cfg.teacher.prompts_file)

    dev = torch.device(default_device(device))
    precision = resolve_precision(cfg.precision, dev)
    tdtype = default_dtype(teacher_dtype, dev)
    pipe, unet = _load_models(teacher, student, dev, tdtype, single_file)
    codes_before = codes_snapshot(unet)
    identity = _identity(teacher, manifest, cfg, prompts)
    params = prepare_student(unet, cfg)
    optimizer = make_optimizer(params, cfg)
    # what a checkpoint and the best student hold: the parameters, and the codes when PV-tuning moves them
    state = {**params, **codes_state(unet)} if cfg.pv_every else params
    done = _resume_or_start(ckpt, identity, state, optimizer, resume, force, cfg)

    val_bank, test_bank = _eval_banks(pipe, unet, cfg, prompts, done)
    # the input's validation error (restored on --resume, so a resumed run gets the same rates)
    lr_scale = engine.error_lr_scale(done.selection.before, cfg.lr_reference_error, cfg.lr_min_scale)
    engine.scale_learning_rates(optimizer, lr_scale)
    done.extra["lr_scale"] = lr_scale
    _train(pipe, unet, cfg, prompts, state, optimizer, precision, done, val_bank,
           lambda: ckpt.save(identity, done.step, done.loss_curve, state, optimizer,
                             {**done.extra, "selection": done.selection.to_dict()}, best=done.selection.best_state),
           stop_after_step, progress, ckpt)
    _finish_training(unet, state, codes_before, test_bank, cfg, done)
    _check_accepted(cfg, done, ckpt)
    distillation = {
        "method": "MSE between student and teacher U-Net outputs on teacher trajectories (SPEC 4)",
        "teacher": {"name": teacher.resolve().name, "family": family, "unet_sha256": identity["teacher_unet_sha256"]},
        "student": {"name": student.resolve().name, "weights_sha256": identity["student_weights_sha256"]},
        **_run_record(cfg, done, params, pipe, precision, dev, tdtype, identity["prompts_sha256"], len(prompts)),
        "seconds": {"trajectories": done.seconds("trajectory"), "training": done.seconds("training"),
                    "total_this_process": time.perf_counter() - start},
    }
    _save_student(unet, manifest, distillation, out, teacher, student, force)
    ckpt.remove()
    sel, ex = done.selection, done.extra
    return DistillResult(out, done.loss_curve, sel.before, sel.best_error, ex["test_error_before"],
                         ex.get("test_error_after"), sel.best_step, bool(ex.get("stopped_early")), sel.improved,
                         time.perf_counter() - start, done.resumed_from, ex.get("lr_scale", 1.0))


def _load_models(teacher: Path, student: Path, dev: torch.device, tdtype: torch.dtype,
                 single_file: SingleFileOptions | None = None) -> tuple:
    """(the teacher pipeline in `tdtype`, the student's VQ U-Net in fp32), both on `dev`, same U-Net config."""
    pipe = load_pipeline(teacher, dtype=tdtype, device=str(dev), single_file=single_file)
    unet, _ = load_vq_unet(student, dtype=torch.float32, device=dev)
    if _public(unet.config) != _public(pipe.unet.config):
        raise ConfigError(f"--student {student} and --teacher {teacher} have different U-Net configs")
    return pipe, unet


def _identity(teacher: Path, manifest: dict, cfg: DistillConfig, prompts: list[str]) -> dict:
    """What a checkpoint must match to be resumed: the inputs, the settings that shape training, the prompts."""
    return json_normalise({
        "teacher_unet_sha256": base_unet_sha256(teacher),
        "student_weights_sha256": manifest["files"][WEIGHTS_FILE],
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("checkpoint_every", "allow_worse", "min_improvement")},
        "prompts_sha256": prompts_digest(prompts),
    })


def _check_accepted(cfg: DistillConfig, done: _Progress, ckpt: DistillCheckpoint) -> None:
    """The never-worse rule: raise DistillNotBetter (checkpoint removed) unless the best student beats
    the input on validation by cfg.min_improvement; with cfg.allow_worse only warn."""
    sel, ex = done.selection, done.extra
    if sel.improved:
        return
    figures = (f"validation relative error {sel.before:.4g} -> {sel.best_error:.4g} (best of step {sel.best_step}); "
               f"test {_fmt(ex['test_error_before'])} -> {_fmt(ex.get('test_error_after'))}")
    if not cfg.allow_worse:
        ckpt.remove()
        raise DistillNotBetter(f"no distilled student beat the input on validation by the required "
                               f"{cfg.min_improvement:.1%} ({figures}); nothing written. Try a lower --lr / "
                               "--lr-codebooks / --lr-scales / --lr-reference-error or more --num-prompts, lower "
                               "--min-improvement, or pass --allow-worse to write the best one anyway")
    log.warning("writing a student that does not beat the input on validation by %.1f%% (--allow-worse): %s",
                100 * cfg.min_improvement, figures)


def _save_student(unet: nn.Module, manifest: dict, distillation: dict, out: Path, teacher: Path, student: Path,
                  force: bool) -> None:
    """The artifact: the trained U-Net, the teacher's other components, the student's manifest + "distillation"."""
    fields = {
        "quantization": manifest["quantization"], "layers": _layer_stats(manifest),
        "base_model": manifest.get("base_model", {}), "calibration": manifest.get("calibration"),
        "distillation": distillation,
    }
    # save_artifact reads only `.unet` when the components are copied from source_dir: the teacher's, or for a
    # single-file teacher the student's (written from that same file: check_inputs matched its sha256).
    source = teacher if teacher.is_dir() else components_dir(student, manifest)
    save_artifact(SimpleNamespace(unet=unet), out, fields, source_dir=source, overwrite=force)


def _fmt(x: float | None) -> str:
    return "n/a (--test-prompts 0)" if x is None else f"{x:.4g}"


def _resume_or_start(ckpt: DistillCheckpoint, identity: dict, params: dict, optimizer, resume: bool, force: bool,
                     cfg: DistillConfig) -> _Progress:
    """The progress to continue from: the checkpoint's (parameters, Adam, selection) on --resume."""
    if resume:
        state = ckpt.load(identity)
        ckpt.restore(state, params, optimizer)
        log.info("resuming at step %d of %d from %s", state["step"], cfg.train_steps, ckpt.path)
        extra = dict(state["extra"])
        selection = engine.Selection.from_dict(extra.pop("selection"), ckpt.read_best(state))
        return _Progress(state["step"], list(state["loss_curve"]), extra, state["step"], selection)
    if force:
        ckpt.remove()
    return _Progress()


def _finish_training(unet: nn.Module, state: dict, codes_before: dict, test_bank: SampleBank | None,
                     cfg: DistillConfig, done: _Progress) -> None:
    """Restore the best student into `state`, check the codes stayed frozen (unless PV-tuning), measure
    the test error after, and leave the U-Net in eval mode."""
    done.selection.restore_best(state)
    if cfg.pv_every:
        done.extra["pv_codes_changed"] = sum(int((m.codes != codes_before[n]).any(-1).sum()) for n, m in vq_modules(unet))
    else:
        check_codes_unchanged(unet, codes_before)
    if test_bank is not None:
        done.extra["test_error_after"] = relative_error(unet, test_bank, cfg.batch_size)
        log.info("test relative error: %.6g -> %.6g", done.extra["test_error_before"], done.extra["test_error_after"])
    unet.disable_gradient_checkpointing()
    unet.eval().requires_grad_(False)


def _eval_banks(pipe, unet: nn.Module, cfg: DistillConfig, prompts: list[str], done: _Progress
                ) -> tuple[SampleBank, SampleBank | None]:
    """Teacher samples of the validation and test prompts, and the input student's errors on them."""
    t0 = time.perf_counter()
    val = record_trajectories(pipe, cfg.sampling(), eval_batches(cfg, prompts, "val"))
    test_batches = eval_batches(cfg, prompts, "test")
    test = record_trajectories(pipe, cfg.sampling(), test_batches) if test_batches else None
    done.add_seconds("trajectory", time.perf_counter() - t0)
    if done.selection is None:
        before = relative_error(unet, val, cfg.batch_size)
        done.selection = engine.Selection(before=before, patience=cfg.patience, min_improvement=cfg.min_improvement)
        done.extra["test_error_before"] = relative_error(unet, test, cfg.batch_size) if test is not None else None
        log.info("input student: validation relative error %.6g, test %s", before, _fmt(done.extra["test_error_before"]))
    return val, test


def _train(pipe, unet: nn.Module, cfg: DistillConfig, prompts: list[str], params: dict, optimizer,
           precision: str, done: _Progress, val_bank: SampleBank, save_checkpoint, stop_after_step: int | None,
           progress: bool, ckpt: DistillCheckpoint) -> None:
    """The rounds: fresh teacher trajectories, then the round's optimizer steps with validation every
    `cfg.validate_every` steps; stops early after `cfg.patience` validations without a new best."""
    rounds, spans = round_batches(cfg, prompts), round_steps(cfg)
    samples_per_round = done.extra.setdefault("samples_per_round", [])
    decoded = DecodedWeights(unet) if cfg.weight_grad == "dense" else None
    # PV-tuning (identity metric: the U-Net artifact carries no H); its Adam moments start afresh on --resume
    pv = PVTuner(decoded.named, cfg.pv(), cfg.teacher.seed) if cfg.pv_every and decoded is not None else None
    if pv is not None:
        pv.steps = done.step  # on --resume: the same update steps (every N, until) as the uninterrupted run
    bar = tqdm(total=cfg.train_steps, initial=done.step, desc="distill", unit="step", disable=not progress)
    with decoded.installed() if decoded is not None else contextlib.nullcontext():
        for r, (first, end) in enumerate(spans):
            if done.step >= end or done.extra.get("stopped_early"):
                continue
            t0 = time.perf_counter()
            with tqdm(total=len(rounds[r]), desc=f"round {r + 1}/{cfg.rounds} teacher", unit="batch", leave=False,
                      disable=not progress) as tbar:
                bank = record_trajectories(pipe, cfg.sampling(), rounds[r], progress=tbar)
            done.add_seconds("trajectory", time.perf_counter() - t0)
            if len(samples_per_round) <= r:
                samples_per_round.append(len(bank))
            log.info("round %d/%d: %d samples (%.2f GB) from %d trajectories", r + 1, cfg.rounds, len(bank),
                     bank.nbytes() / 1e9, sum(len(b.prompts) for b in rounds[r]))
            t0 = time.perf_counter()
            while done.step < end:
                order = sample_order(cfg.teacher.seed, r, len(bank), (done.step - first) * cfg.effective_batch,
                                     cfg.effective_batch)
                loss = train_step(unet, bank, list(order.split(cfg.batch_size)), optimizer, precision, decoded,
                                  done.step, cfg, pv)
                done.loss_curve.append(loss)
                done.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}", round=r + 1)
                if done.step % cfg.validate_every == 0 or done.step == cfg.train_steps:
                    val = relative_error(unet, val_bank, cfg.batch_size)
                    if done.selection.update(done.step, val, params) and done.step < cfg.train_steps:
                        done.extra["stopped_early"] = True
                        log.info("validation error has not improved for %d evaluations: stopping at step %d "
                                 "(best %.6g at step %d)", cfg.patience, done.step, done.selection.best_error,
                                 done.selection.best_step)
                if (done.step % cfg.checkpoint_every == 0 or done.step == end or done.step == stop_after_step
                        or done.extra.get("stopped_early")):
                    done.add_seconds("training", time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    save_checkpoint()
                if stop_after_step is not None and done.step >= stop_after_step:
                    bar.close()
                    raise DistillStopped(f"stopped after step {done.step} as asked; continue with --resume "
                                         f"(checkpoint {ckpt.path})")
                if done.extra.get("stopped_early"):
                    break
            done.add_seconds("training", time.perf_counter() - t0)
            del bank
    bar.close()


def _run_record(cfg: DistillConfig, done: _Progress, params: dict, pipe, precision: str, dev: torch.device,
                tdtype: torch.dtype, prompts_sha256: str, prompt_lines: int) -> dict:
    """The settings and outcome part of the manifest's "distillation" section."""
    curve, sel, ex = done.loss_curve, done.selection, done.extra
    return {
        **cfg.to_dict(),
        "effective_batch": cfg.effective_batch,
        "seeds_per_prompt_used": cfg.trajectories_per_prompt, "trajectories": cfg.num_trajectories,
        "optimizer": {"name": "Adam", "lr": {g: lr * ex.get("lr_scale", 1.0) for g, lr in cfg.optim().lrs().items()},
                      "lr_scale": ex.get("lr_scale", 1.0), "betas": [cfg.beta1, cfg.beta2],
                      "schedule": f"linear warmup over {cfg.warmup:.0%} of the steps, cosine to "
                                  f"{cfg.min_lr_factor:g} x", "clip_grad_norm": cfg.clip_grad_norm},
        "precision": precision, "device": str(dev), "teacher_dtype": str(tdtype).replace("torch.", ""),
        "scheduler_name": "DDIMScheduler" if cfg.teacher.scheduler == "ddim" else type(pipe.scheduler).__name__,
        "prompts_sha256": prompts_sha256, "prompt_lines": prompt_lines,
        "samples_per_round": ex.get("samples_per_round", []),
        "trainable_parameters": sum(p.numel() for p in params.values()),
        "trainable": "codebooks, scales and every non-quantized U-Net parameter "
                     + ("and the codes (PV-tuning)" if cfg.pv_every else "(codes frozen)"),
        "pv_codes_changed": ex.get("pv_codes_changed"),
        "loss_curve": curve,
        "loss_first": curve[0] if curve else None, "loss_last": curve[-1] if curve else None,
        "error": "relative U-Net output error sum |student - teacher|^2 / sum |teacher|^2 on teacher trajectories",
        "val_error_before": sel.before, "val_error_after": sel.best_error, "val_history": sel.history,
        "best_step": sel.best_step, "steps_run": done.step, "stopped_early": bool(ex.get("stopped_early")),
        "improved_on_validation": sel.improved, "val_change": sel.relative_change,
        "test_error_before": ex.get("test_error_before"), "test_error_after": ex.get("test_error_after"),
        "resumed_from_step": done.resumed_from,
    }


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}
