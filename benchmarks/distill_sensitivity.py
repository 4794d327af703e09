"""Does `vqdm distill` with default flags recover quality? Tiny SDXL / tiny Turbo, K, prompts, seeds, lr.

Families: the tiny random-weight SDXL and Turbo (`vqdm make-model`) and `digits`, the trained tiny
model the repo ships (`vqdm/models/pretrained/tiny-sdxl-digits`, benchmarks/train_tiny.py), distilled at
its own resolution (32) and guidance (4) on its 30 digit prompts (held-out prompts reuse those
texts with new seeds once 30 are used). For every (family, K) a student is made once: the model
quantized with the real AQ at cheap settings (identity H, beam 2, 2 Adam steps, 1 round: the CPU
budget; a weaker student than `vqdm quantize` gives, so there is more to recover). Then
`vqdm distill` runs with the preset's defaults except the run size (prompts, steps, resolution,
train steps, and batch 4 x 2 instead of 4 x 16 / 8 x 8: small for a CPU) and the figures are the test-set relative U-Net error
Σ‖ε_student − ε_teacher‖² / Σ‖ε_teacher‖² on unseen prompts and seeds (the `vqdm eval`
`unet_rel_mse` metric on prompts never used for training or selection), before and after.

    .venv/bin/python benchmarks/distill_sensitivity.py grid --families sdxl,sdxl-turbo,digits --ks 2,3 \
        --prompts 8,32,128 --seeds 0,1,2            # appends to benchmarks/results/distill_sensitivity.json
    .venv/bin/python benchmarks/distill_sensitivity.py lr --lr-scale 0.1,10   # lr panel: 32 prompts, seed 0
    .venv/bin/python benchmarks/distill_sensitivity.py plot   # -> benchmarks/results/distill_sensitivity.png
    .venv/bin/python benchmarks/distill_sensitivity.py table  # the README's summary table

Every finished cell is written at once (a partial run keeps what it measured); a cell already
in the JSON is skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from vqdm.models import load_pipeline, make_model, quantize_layers, vq_modules
from vqdm.models.artifact import MANIFEST_FILE, save_artifact, unet_fingerprint
from vqdm.models.digits import DIGITS_MODEL_DIR, training_prompts
from vqdm.quantizer import quantize_weight
from vqdm.quantizer.distill.run import DistillNotBetter, distill
from vqdm.quantizer.quantize.config import make_aq_config
from vqdm.quantizer.distill.recipes import detect_recipe

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "distill_sensitivity.json"
RUN = {"resolution": 64, "train_steps": 40, "batch_size": 4, "grad_accum": 2, "val_prompts": 8, "test_prompts": 8}
STEPS = {"sdxl": 4, "sdxl-turbo": 2, "digits": 4}
FAMILY_RUN = {"digits": {"resolution": 32, "guidance": 4.0}}  # the trained model's own preset (64 for the others)
FAMILIES = ("sdxl", "sdxl-turbo", "digits")


def make_student(teacher: Path, out: Path, k: int) -> Path:
    cfg = make_aq_config(k, beam_size=2, adam_steps=2, cg_iters=0, damping=0.0, max_rounds=1, kmeans_iters=10,
                          init_passes=0)

    def fn(name, w):
        qw = quantize_weight(w, torch.eye(w.shape[1], dtype=torch.float64), cfg)
        return qw.codes, qw.codebooks.detach().float(), qw.scales.detach().float()

    pipe = load_pipeline(teacher)
    quantize_layers(pipe.unet, k, fn)
    layers = {n: {"rel_error": None, "seconds": 0.0} for n, _ in vq_modules(pipe.unet)}
    return save_artifact(pipe, out, {"layers": layers, "calibration": {"note": "identity H, cheap AQ"},
                                     "base_model": {"name": teacher.name, "unet_sha256": unet_fingerprint(source_dir=teacher)}},
                         source_dir=teacher)


def teacher_dir(work: Path, family: str) -> Path:
    if family == "digits":
        return DIGITS_MODEL_DIR
    teacher = work / f"teacher-{family}"
    if not teacher.exists():
        make_model("tiny-sdxl" if family == "sdxl" else "tiny-sdxl-turbo", teacher, seed=0 if family == "sdxl" else 1)
    return teacher


def digit_prompts_file(work: Path) -> Path:
    """The 30 prompts the digits model was trained on, digit-major within each template."""
    path = work / "digit_prompts.txt"
    path.write_text("\n".join(training_prompts()) + "\n")
    return path


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"] if path.is_file() else []


def save(path: Path, cells: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "distill_sensitivity", "run": RUN, "steps": STEPS, "cells": cells},
                               indent=1) + "\n")


def run_cell(work: Path, family: str, k: int, prompts: int, seed: int, lr_scale: float, pv_every: int = 0,
             train_steps: int = RUN["train_steps"], pv_step: float | None = None, pv_trust: float | None = None) -> dict:
    teacher = teacher_dir(work, family)
    student = work / f"student-{family}-k{k}"
    if not student.exists():
        make_student(teacher, student, k)
    base = detect_recipe(teacher)
    # as the CLI does (fit_rounds), then the run size
    cfg = base.fit_rounds(prompts).replace(steps=STEPS[family], seed=seed, **{**RUN, **FAMILY_RUN.get(family, {})})
    if family == "digits":
        cfg = cfg.replace(prompts_file=str(digit_prompts_file(work)))
    cfg = cfg.replace(train_steps=train_steps, pv_every=pv_every, pv_step=pv_step, pv_trust=pv_trust)
    if pv_every:  # PV-tuning stops at the same step whatever the run length (equal-time runs are longer)
        cfg = cfg.replace(pv_until=min(1.0, 0.8 * RUN["train_steps"] / train_steps))
    if lr_scale != 1:
        cfg = cfg.replace(lr=cfg.lr * lr_scale, lr_codebooks=cfg.lr_codebooks * lr_scale,
                          lr_scales=cfg.lr_scales * lr_scale)
    t0 = time.perf_counter()
    cell = {"family": family, "k": k, "prompts": prompts, "seed": seed, "lr_scale": lr_scale,
            "lr": [cfg.lr, cfg.lr_codebooks, cfg.lr_scales], "train_steps": cfg.train_steps,
            "pv_every": cfg.pv_every, "pv_step": cfg.pv_step if pv_every else None,
            "pv_trust": cfg.pv_trust if pv_every else None}
    try:
        r = distill(teacher, student, work / "out", cfg, force=True, progress=False)
        cell |= {"written": True, "val": [r.val_error_before, r.val_error_after], "best_step": r.best_step,
                 "test_before": r.test_error_before, "test_after": r.test_error_after, "error_lr_scale": r.lr_scale}
        d = json.loads((work / "out" / MANIFEST_FILE).read_text())["distillation"]
        cell |= {"seconds_training": d["seconds"]["training"], "pv_codes_changed": d.get("pv_codes_changed")}
    except DistillNotBetter as e:
        cell |= {"written": False, "message": str(e)}
    cell["seconds"] = time.perf_counter() - t0
    return cell


def grid(args, cells: list[dict]) -> None:
    done = {(c["family"], c["k"], c["prompts"], c["seed"], c["lr_scale"], c.get("pv_every", 0),
             c.get("train_steps", RUN["train_steps"])) for c in cells}
    todo = [(f, k, p, s, ls, pv, ts) for p in args.prompts for s in args.seeds for f in args.families for k in args.ks
            for ls in args.lr_scale for pv in args.pv_every for ts in args.train_steps]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        for key in todo:
            if key in done:
                continue
            cell = run_cell(work, *key, pv_step=args.pv_step, pv_trust=args.pv_trust)
            cells.append(cell)
            save(args.json, cells)
            print(json.dumps(cell), flush=True)


def plot(path: Path, cells: list[dict], png: Path) -> None:
    import matplotlib  # deferred: only the plot needs it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in cells if is_default_run(c)]

    has_lr = any(c["lr_scale"] != 1 for c in cells)  # the lr panel only once `lr` mode has run
    fig, axes = plt.subplots(1, 2 if has_lr else 1, figsize=(10 if has_lr else 5.5, 3.8), squeeze=False)
    a, b = axes[0][0], (axes[0][1] if has_lr else None)

    def change(c):  # written: test change; not written: the input is kept, change 0
        return 100 * (c["test_after"] / c["test_before"] - 1) if c.get("written") else 0.0

    for (fam, k), marker in zip([(f, k) for f in FAMILIES for k in (2, 3)], "os^v<>"):
        sel = [c for c in cells if c["family"] == fam and c["k"] == k and c["lr_scale"] == 1]
        ps = sorted({c["prompts"] for c in sel})
        if ps:
            a.plot(ps, [sum(change(c) for c in sel if c["prompts"] == p) / len([c for c in sel if c["prompts"] == p])
                        for p in ps], marker=marker, label=f"{fam} K={k}")
        lr = [c for c in cells if c["family"] == fam and c["k"] == k and c["lr_scale"] != 1 or
              (c["family"] == fam and c["k"] == k and c["lr_scale"] == 1 and c["prompts"] == 32 and c["seed"] == 0)]
        if b is not None and len({c["lr_scale"] for c in lr}) > 1:
            xs = sorted({c["lr_scale"] for c in lr})
            b.plot(xs, [next(change(c) for c in lr if c["lr_scale"] == x) for x in xs], marker=marker,
                   label=f"{fam} K={k}")
    a.set(xscale="log", xlabel="training prompts (default flags; mean over seeds)",
          ylabel="test U-Net rel. error change (%)", title="prompt count")
    if b is not None:
        b.set(xscale="log", xlabel="learning-rate multiplier on the preset (32 prompts, seed 0)", title="learning rate")
    for ax in [x for x in (a, b) if x is not None]:
        ax.axhline(0, color="k", lw=0.5)
        ax.axhline(-25, color="r", lw=0.5, ls="--")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def is_default_run(cell: dict) -> bool:
    """A cell of the grid's default run size without PV-tuning (the table's and the plot's)."""
    return cell.get("pv_every", 0) == 0 and cell.get("train_steps", RUN["train_steps"]) == RUN["train_steps"]


def table(cells: list[dict]) -> str:
    """Markdown: per family and K, the test change at each prompt count over seeds (worst / mean / best), default lr."""
    cells = [c for c in cells if c["lr_scale"] == 1 and is_default_run(c)]
    counts = sorted({c["prompts"] for c in cells})
    lines = ["| family | K | " + " | ".join(f"{p} prompts: worst / mean / best" for p in counts) + " | written |",
             "|---|---|" + "---|" * len(counts) + "---|"]
    for fam in FAMILIES:
        for k in (2, 3):
            sel = [c for c in cells if c["family"] == fam and c["k"] == k]
            if not sel:
                continue
            row = []
            for p in counts:
                ch = [100 * (c["test_after"] / c["test_before"] - 1) for c in sel if c["prompts"] == p and c.get("written")]
                row.append(f"{max(ch):+.1f} / {sum(ch) / len(ch):+.1f} / {min(ch):+.1f}" if ch else "—")
            written = sum(bool(c.get("written")) for c in sel)
            lines.append(f"| {fam} | {k} | " + " | ".join(row) + f" | {written} / {len(sel)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("grid", "lr", "plot", "table"))
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--ks", default="2,3")
    ap.add_argument("--prompts", default="8,32,128")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr-scale", default="1")
    ap.add_argument("--pv-every", default="0", help="comma-separated PV-tuning periods (0: codes frozen)")
    ap.add_argument("--pv-step", type=float, help="PV-tuning step (default: the config's)")
    ap.add_argument("--pv-trust", type=float, help="PV-tuning trust ratio (default: the config's)")
    ap.add_argument("--train-steps", default=str(RUN["train_steps"]), help="comma-separated optimizer step counts")
    ap.add_argument("--work", help="folder for teachers/students (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.families = args.families.split(",")
    args.ks = [int(x) for x in args.ks.split(",")]
    args.prompts = [int(x) for x in args.prompts.split(",")]
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.lr_scale = [float(x) for x in args.lr_scale.split(",")]
    args.pv_every = [int(x) for x in args.pv_every.split(",")]
    args.train_steps = [int(x) for x in args.train_steps.split(",")]
    cells = load(args.json)
    if args.mode == "lr":
        args.prompts, args.seeds = [32], [0]
    if args.mode == "table":
        print(table(cells))
        return 0
    if args.mode in ("grid", "lr"):
        grid(args, cells)
    plot(args.json, cells, args.json.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
