"""`vqdm distill` settings (SPEC §4); the per-family defaults are in `vqdm.quantizer.distill.recipes`."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from vqdm.errors import ConfigError
from vqdm.quantizer.distill.engine import OptimSettings
from vqdm.quantizer.distill.pv_tuning import PVSettings
from vqdm.quantizer.sampling import SamplingConfig

PRECISIONS = ("auto", "bf16", "fp32")
MIN_PROMPTS_PER_ROUND = 8
# Trajectories (prompt, noise seed) a round should hold; small runs draw several seeds per prompt
# to get there. Measured on tiny Turbo K = 3, 8 prompts at 2 steps (16 samples, each revisited 20
# times in 40 steps): test error -13..-18% with one seed per prompt, -26..-29% with four
# (benchmarks/distill_sensitivity.py; docs/distill.md).
MIN_TRAJECTORIES_PER_ROUND = 32
WEIGHT_GRADS = ("dense", "per-call")


@dataclass
class DistillConfig:
    """One distillation run. Presets hold the SPEC §4 recipe; the CLI overrides fields."""

    # The teacher trajectories' prompts and sampling: num_prompts = training prompts over all rounds
    # (the prompt file is cycled with fresh seeds), batch_size = prompts per teacher pipeline call
    # (--gen-batch-size); steps are the teacher's (Turbo, vary_steps: batches cycle 1..steps); seed
    # also orders the samples. Each prompt is sampled with `trajectories_per_prompt` seeds: `sampling()`.
    teacher: SamplingConfig
    rounds: int
    train_steps: int  # optimizer steps over all rounds
    batch_size: int  # samples per micro-batch (a sample: one prompt at one step, both CFG halves)
    grad_accum: int  # micro-batches per optimizer step
    lr: float = 1e-6  # every non-quantized parameter (norms, biases, embeddings, conv_in/out)
    lr_codebooks: float = 1e-6
    lr_scales: float = 1e-6
    # The rates above suit a student whose validation error is this; a closer student gets them
    # scaled by its error / this, never up (engine.error_lr_scale; docs/distill.md). None: as given.
    lr_reference_error: float | None = None
    lr_min_scale: float = 1e-3  # the scaling never goes below this factor (tiny preset: 0.25)
    warmup: float = 0.1  # fraction of train_steps with a linear ramp of the learning rates
    min_lr_factor: float = 0.1  # cosine decay to this fraction of each learning rate
    clip_grad_norm: float | None = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    # noise seeds per training prompt, each its own trajectory; None: enough for
    # MIN_TRAJECTORIES_PER_ROUND a round (1 for the SPEC runs: 512 and 10,240 prompts a round)
    seeds_per_prompt: int | None = None
    val_prompts: int = 8  # unseen prompts/seeds: model selection and early stopping
    test_prompts: int = 8  # other unseen prompts/seeds, never used for selection: the reported figures
    eval_every: int | None = None  # optimizer steps between validations (None: train_steps // 10, at least 1)
    patience: int = 5  # validations without a new best before stopping (default: half the run)
    allow_worse: bool = False  # write the student even when it does not beat the input on validation
    # relative validation gain over the input needed to write the student (below it the "gain" may be
    # the validation set's noise: a −0.7% validation gain came with +13% on test, docs/distill.md)
    min_improvement: float = 0.02
    precision: str = "auto"  # autocast: "auto" = bf16 on CUDA when supported, else fp32
    gradient_checkpointing: bool = True
    weight_grad: str = "dense"
    checkpoint_every: int = 100
    # PV-tuning (vqdm/quantizer/distill/pv_tuning.py): move the codes every pv_every optimizer steps
    # (0: off, codes frozen as in the paper). Needs weight_grad "dense" (it reads dL/dŴ there).
    pv_every: int = 0
    pv_step: float = 0.1  # η, relative to each layer's rms(Ŵ), along Adam's direction m̂/√v̂
    pv_trust: float = 0.003  # at most this fraction of each layer's (row, group) pairs change per update
    pv_until: float = 0.8  # no code updates after this fraction of train_steps (the codebooks adapt to the last)

    def __post_init__(self) -> None:
        checks = [
            (self.rounds >= 1, f"--rounds must be at least 1, got {self.rounds}"),
            (self.train_steps >= self.rounds, f"--train-steps ({self.train_steps}) must be at least --rounds ({self.rounds})"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (self.lr > 0 and self.lr_codebooks > 0 and self.lr_scales > 0,
             f"learning rates must be positive, got --lr {self.lr}, --lr-codebooks {self.lr_codebooks}, "
             f"--lr-scales {self.lr_scales}"),
            (0 <= self.warmup < 1, f"--warmup must lie in [0, 1), got {self.warmup}"),
            (0 <= self.min_lr_factor <= 1, f"min_lr_factor must lie in [0, 1], got {self.min_lr_factor}"),
            (self.clip_grad_norm is None or self.clip_grad_norm > 0,
             f"--clip-grad-norm must be positive, got {self.clip_grad_norm}"),
            (self.val_prompts >= 1, f"--val-prompts must be at least 1 (validation guards against a worse student), "
                                    f"got {self.val_prompts}"),
            (self.test_prompts >= 0, f"--test-prompts must be >= 0, got {self.test_prompts}"),
            (self.eval_every is None or self.eval_every >= 1, f"--eval-every must be at least 1, got {self.eval_every}"),
            (self.lr_reference_error is None or self.lr_reference_error > 0,
             f"--lr-reference-error must be positive (to turn scaling off: --flat-lr), got {self.lr_reference_error}"),
            (0 < self.lr_min_scale <= 1, f"--lr-min-scale must lie in (0, 1], got {self.lr_min_scale}"),
            (0 <= self.min_improvement < 1, f"--min-improvement must lie in [0, 1), got {self.min_improvement}"),
            (self.patience >= 1, f"--patience must be at least 1, got {self.patience}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"Adam betas must lie in [0, 1), got {self.beta1}, {self.beta2}"),
            (self.seeds_per_prompt is None or self.seeds_per_prompt >= 1,
             f"--seeds-per-prompt must be at least 1, got {self.seeds_per_prompt}"),
            (self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.weight_grad in WEIGHT_GRADS, f"--weight-grad must be one of {WEIGHT_GRADS}, got {self.weight_grad!r}"),
            (self.checkpoint_every >= 1, f"--checkpoint-every must be at least 1, got {self.checkpoint_every}"),
            (self.pv_every >= 0, f"--pv-every must be >= 0 (0: off), got {self.pv_every}"),
            (self.pv_every == 0 or self.weight_grad == "dense",
             "--pv-every needs --weight-grad dense (PV-tuning reads the dense weight gradients)"),
            (self.pv_step > 0, f"--pv-step must be positive, got {self.pv_step}"),
            (0 < self.pv_trust <= 1, f"--pv-trust must lie in (0, 1], got {self.pv_trust}"),
            (0 < self.pv_until <= 1, f"--pv-until must lie in (0, 1], got {self.pv_until}"),
            (math.ceil(self.teacher.num_prompts / self.teacher.batch_size) >= self.rounds,
             f"{self.teacher.num_prompts} prompt(s) in batches of {self.teacher.batch_size} cannot fill "
             f"{self.rounds} rounds"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def trajectories_per_prompt(self) -> int:
        """Seeds per training prompt: `seeds_per_prompt`, or enough for MIN_TRAJECTORIES_PER_ROUND a round."""
        if self.seeds_per_prompt is not None:
            return self.seeds_per_prompt
        return max(1, math.ceil(MIN_TRAJECTORIES_PER_ROUND * self.rounds / self.teacher.num_prompts))

    @property
    def num_trajectories(self) -> int:
        """Teacher trajectories over all rounds: every training prompt with each of its seeds."""
        return self.teacher.num_prompts * self.trajectories_per_prompt

    @property
    def validate_every(self) -> int:
        return self.eval_every or max(1, self.train_steps // 10)

    def fit_rounds(self, num_prompts: int | None = None, gen_batch_size: int | None = None) -> "DistillConfig":
        """This config with `num_prompts` / `gen_batch_size` (if given) and the preset's rounds, fewer
        when the run is small: each round keeps at least MIN_PROMPTS_PER_ROUND prompts (2 prompts a
        round were trained on for dozens of passes and over-fitted: docs/distill.md) and one teacher
        batch. Used when --rounds is not given."""
        n = num_prompts or self.teacher.num_prompts
        gb = gen_batch_size or self.teacher.batch_size
        rounds = max(1, min(self.rounds, n // MIN_PROMPTS_PER_ROUND, math.ceil(n / gb)))
        return self.replace(num_prompts=n, gen_batch_size=gb, rounds=rounds)

    def optim(self) -> OptimSettings:
        return OptimSettings(lr=self.lr, lr_codebooks=self.lr_codebooks, lr_scales=self.lr_scales,
                             betas=(self.beta1, self.beta2), warmup=self.warmup, min_lr_factor=self.min_lr_factor,
                             clip_grad_norm=self.clip_grad_norm)

    def pv(self) -> PVSettings | None:
        """PV-tuning settings, None when off."""
        if not self.pv_every:
            return None
        return PVSettings(every=self.pv_every, step_size=self.pv_step, trust_ratio=self.pv_trust,
                          until=int(self.pv_until * self.train_steps))

    def replace(self, **overrides) -> "DistillConfig":
        """A copy with the fields given, by their flat (CLI and manifest) names: TEACHER_FIELDS go to
        `teacher`. None keeps this config's value; `flat_lr=True` sets lr_reference_error to None
        (the rates as given, not scaled by the student's error)."""
        flat = overrides.pop("flat_lr", None)
        given = {k: v for k, v in overrides.items() if v is not None}
        teacher = {TEACHER_FIELDS[k]: given.pop(k) for k in list(given) if k in TEACHER_FIELDS}
        out = dataclasses.replace(self, teacher=self.teacher.replace(**teacher), **given)
        return dataclasses.replace(out, lr_reference_error=None) if flat else out

    def to_dict(self) -> dict:
        """Flat, in the field order manifests and checkpoint identities have always had."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "teacher"}
        teacher = {flat: getattr(self.teacher, name) for flat, name in TEACHER_FIELDS.items()}
        return {k: own[k] if k in own else teacher[k] for k in FLAT_ORDER}

    def sampling(self) -> SamplingConfig:
        """The sampling settings of the teacher trajectories (every training prompt with each of its seeds)."""
        return dataclasses.replace(self.teacher, num_prompts=self.num_trajectories)


# DistillConfig's flat names of the `teacher` fields (CLI flags, manifest keys) -> SamplingConfig's.
TEACHER_FIELDS = {"num_prompts": "num_prompts", "steps": "steps", "guidance": "guidance", "resolution": "resolution",
                  "scheduler": "scheduler", "vary_steps": "vary_steps", "seed": "seed",
                  "prompts_file": "prompts_file", "gen_batch_size": "batch_size"}
# The key order of `to_dict` (manifests' "distillation" section): the order of the fields before
# the teacher's sampling settings became a SamplingConfig.
FLAT_ORDER = ("num_prompts", "rounds", "steps", "guidance", "resolution", "scheduler", "vary_steps", "train_steps",
              "batch_size", "grad_accum", "lr", "lr_codebooks", "lr_scales", "lr_reference_error", "lr_min_scale",
              "warmup", "min_lr_factor", "clip_grad_norm", "beta1", "beta2", "seed", "prompts_file", "gen_batch_size",
              "seeds_per_prompt", "val_prompts", "test_prompts", "eval_every", "patience", "allow_worse",
              "min_improvement", "precision", "gradient_checkpointing", "weight_grad", "checkpoint_every", "pv_every",
              "pv_step", "pv_trust", "pv_until")
