"""Quantization quality on the trained tiny digits model: dense vs AQ / GPTQ / RTN, AQ before and after distillation.

    python benchmarks/quality_trained_tiny.py [--json FILE] [--png FILE] [--workdir DIR] [--quick]

The model is the shipped `tiny-sdxl-digits` (benchmarks/train_tiny.py): trained diffusion weights,
so errors show up as worse digits, not as different noise. Variants: dense; AQ K = 2 / 3 / 4 and
AQ K = 2 / 3 after distillation (the real `vqdm quantize` and `vqdm distill` commands, calibrated on
the model's own sampling trajectories for the training prompts); GPTQ 3 / 4-bit and RTN 4-bit
(`vqdm.quantizer.gptq_quantize` / `rtn_quantize` on the same layers, GPTQ's H from the same
prompts). Only the CLI commands and `vqdm.quantizer` / `vqdm.models` public functions are used.

Scores per variant:
- class accuracy of generated digits, per prompt (digit) and overall, judged by scikit-learn's
  LogisticRegression on the real 8×8 digits (`vqdm.quantizer.evaluate.digits.DigitJudge`);
- Fréchet distance between generated and held-out real digits in the 64-value 8×8 pixel space;
- U-Net output relative MSE on the dense model's trajectories and final-latent / image PSNR vs
  dense (`vqdm eval`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from vqdm.models import Preset, load_pipeline, select_layers
from vqdm.models.digits import DIGITS_MODEL_DIR, DIGITS_PRESET, digit_prompt, training_prompts
from vqdm.quantizer.evaluate.digits import DigitJudge, generate_digits, images_to_digits
from vqdm.quantizer.evaluate.fid import feature_frechet_distance

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from quality_tiny import scalar_baseline  # noqa: E402  (benchmarks/ is not a package)


def vqdm_cli(*commands: list[str], log_dir: Path) -> None:
    """Run `vqdm` subcommands (what a user types), each in its own process, all at once; fail loudly.

    Independent runs in parallel: on a shared 2-core machine each single-threaded process gets its
    own share of the CPU.
    """
    procs = []
    for i, args in enumerate(commands):
        print("$ vqdm " + " ".join(args), flush=True)
        log = open(log_dir / f"{args[0]}-{Path(args[args.index('--out') + 1]).name}.log", "w")
        # One intra-op thread per process (as --threads here): a second one spin-waits on shared cores.
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        procs.append((subprocess.Popen([sys.executable, "-m", "vqdm.cli", *args, "--no-progress"], stdout=log,
                                       stderr=subprocess.STDOUT, env=env), log, args))
    for proc, log, args in procs:
        if proc.wait() != 0:
            raise SystemExit(f"vqdm {' '.join(args)} failed: see {log.name}")
        log.close()


def layer_inputs_h(pipe, prompts: list[str], steps: int, guidance: float, resolution: int) -> dict[str, torch.Tensor]:
    """H = mean x xᵀ of every selected layer's inputs while sampling `prompts` (GPTQ's statistics).

    Conv inputs are unfolded into the (k_h, k_w, C_in) column order of `weight_matrix`.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name, m):
        def f(_, args):
            x = args[0].detach().float()
            if isinstance(m, torch.nn.Conv2d):
                kh, kw = m.kernel_size
                cols = torch.nn.functional.unfold(x, m.kernel_size, padding=m.padding, stride=m.stride)  # [N, C*kh*kw, L]
                n, _, length = cols.shape
                cols = cols.view(n, m.in_channels, kh * kw, length).permute(0, 3, 2, 1)  # -> (k_h, k_w, C_in) columns
                rows = cols.reshape(-1, kh * kw * m.in_channels)
            else:
                rows = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + rows.T @ rows
            counts[name] = counts.get(name, 0) + rows.shape[0]
        return f

    for name, m in select_layers(pipe.unet):
        hooks.append(m.register_forward_pre_hook(hook(name, m)))
    try:
        with torch.inference_mode():
            for i in range(0, len(prompts), 20):
                pipe(prompts[i:i + 20], num_inference_steps=steps, guidance_scale=guidance, height=resolution,
                     width=resolution, generator=torch.Generator().manual_seed(i), output_type="latent")
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def judge_variant(folder: Path, judge: DigitJudge, seeds: list[int], x_test: np.ndarray) -> tuple[dict, list]:
    pipe = load_pipeline(folder)
    images, labels = generate_digits(pipe, list(range(10)), seeds, batch_size=50)
    pred = judge.predict(images_to_digits(images))
    labels = np.array(labels)
    per_digit = {str(d): float((pred[labels == d] == d).mean()) for d in range(10)}
    grid = [images[i] for i in range(10)]  # the first seed, digits 0-9
    return {"class_accuracy": float((pred == labels).mean()), "class_accuracy_per_prompt": per_digit,
            "frechet_distance": feature_frechet_distance(images_to_digits(images), x_test)}, grid


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DIGITS_MODEL_DIR), help="the dense digits model (default: the shipped one)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--png", help="write the image grid (variants × digits 0-9) here")
    ap.add_argument("--workdir", help="keep the models here (default: a temporary folder); existing ones are reused")
    ap.add_argument("--quick", action="store_true", help="fewer prompts, rounds and steps (a smoke run)")
    ap.add_argument("--judge-seeds", type=int, help="seeds per digit judged (default 2 with --quick, else 10)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models on shared cores)")
    return ap.parse_args(argv)


def settings(quick: bool, judge_seeds: int | None, preset: Preset) -> dict:
    res, guidance, steps = preset.resolution, preset.guidance, preset.steps
    return {  # every setting in one place, recorded in the JSON
        "resolution": res, "guidance": guidance, "sampling_steps": steps,
        "calibration": dict(num_prompts=10 if quick else 30, steps=4 if quick else 10, batch_size=10),
        # init_passes 0 and tolerance 0.01: the AQ defaults the README table was measured with
        "aq": dict(beam=8, adam_steps=20 if quick else 100, max_rounds=2 if quick else 3, kmeans_iters=20 if quick else 100,
                   init_passes=0, tolerance=0.01),
        # The distillation recipe is the tiny one `vqdm distill` detects (lrs, warmup, clipping, rounds,
        # validation/test prompts); --allow-worse so a student that does not beat its input on validation
        # is still written and scored here, marked as such.
        "distill": dict(num_prompts=16 if quick else 60, steps=4 if quick else 10, train_steps=40 if quick else 100),
        "eval": dict(num_prompts=10, steps=steps, seed=1000),
        "judge_seeds": list(range(judge_seeds or (2 if quick else 10))),
    }


def scalar_variants(teacher: Path, work: Path, s: dict, train_prompts: list[str], rows: dict, candidates: dict) -> None:
    """RTN 4-bit, GPTQ 4- and 3-bit folders (GPTQ's H from the training prompts), added to `rows` and `candidates`."""
    hessians = None
    for method, bits in (("rtn", 4), ("gptq", 4), ("gptq", 3)):
        label = f"{method.upper()} {bits}-bit"
        folder = work / label.replace(" ", "-")
        if method == "gptq" and hessians is None:
            c = s["calibration"]
            hessians = layer_inputs_h(load_pipeline(teacher), train_prompts[:c["num_prompts"]], c["steps"], s["guidance"],
                                      s["resolution"])
        rows[label] = {"method": method, "bits": bits, **scalar_baseline(teacher, folder, method, bits, hessians)}
        candidates[label] = folder
        print(f"{label}: done", flush=True)
    del hessians


def aq_variants(teacher: Path, work: Path, s: dict, common: list[str], rows: dict, candidates: dict) -> None:
    """AQ K = 4, 3, 2 (`vqdm quantize`) and K = 3, 2 distilled (`vqdm distill`), each batch in parallel processes;
    added to `rows` and `candidates`. Folders already in `work` (an earlier run's --workdir) are reused."""
    c, a, d = s["calibration"], s["aq"], s["distill"]
    aq = {k: work / f"AQ-{k}" for k in (4, 3, 2)}
    todo = [k for k, folder in aq.items() if not folder.exists()]  # --workdir of an earlier run: reused
    t0 = time.perf_counter()
    vqdm_cli(*[["quantize", "--model", str(teacher), "--preset", "sdxl", "--bits", str(k), "--out", str(aq[k]), *common,
                "--num-prompts", str(c["num_prompts"]), "--steps", str(c["steps"]), "--batch-size", str(c["batch_size"]),
                "--beam", str(a["beam"]), "--adam-steps", str(a["adam_steps"]), "--max-rounds", str(a["max_rounds"]),
                "--kmeans-iters", str(a["kmeans_iters"]), "--init-passes", str(a["init_passes"]),
                "--tolerance", str(a["tolerance"])] for k in todo], log_dir=work)
    aq_seconds = time.perf_counter() - t0
    for k, folder in aq.items():
        manifest = json.loads((folder / "unet" / "manifest.json").read_text())
        rows[f"AQ K={k}"] = {"method": "aq", "bits": k, "bits_per_weight_quantized": manifest["bits_per_weight"]["quantized"],
                             "quantize_seconds_wall_parallel": aq_seconds if k in todo else None, "reused": k not in todo}
        candidates[f"AQ K={k}"] = folder
    distilled = {k: work / f"AQ-{k}-distill" for k in (3, 2)}
    todo = [k for k, folder in distilled.items() if not folder.exists()]
    t0 = time.perf_counter()
    vqdm_cli(*[["distill", "--teacher", str(teacher), "--student", str(aq[k]), "--out", str(distilled[k]), *common,
                "--num-prompts", str(d["num_prompts"]), "--steps", str(d["steps"]), "--train-steps", str(d["train_steps"]),
                "--allow-worse"] for k in todo], log_dir=work)
    distill_seconds = time.perf_counter() - t0
    for k, folder in distilled.items():
        dist = json.loads((folder / "unet" / "manifest.json").read_text())["distillation"]
        rows[f"AQ K={k} + distill"] = {**rows[f"AQ K={k}"], "distill_seconds_wall_parallel": distill_seconds if k in todo else None,
                                       "reused": k not in todo, "distill_loss_first": dist["loss_first"],
                                       "distill_loss_last": dist["loss_last"],
                                       "distill_test_error_before": dist.get("test_error_before"),
                                       "distill_test_error_after": dist.get("test_error_after"),
                                       "distill_improved_on_validation": dist.get("improved_on_validation")}
        candidates[f"AQ K={k} + distill"] = folder


def eval_variants(teacher: Path, work: Path, s: dict, rows: dict, candidates: dict) -> None:
    """`vqdm eval`: same prompts and seeds for dense and every candidate; the digit prompts at the served setting."""
    e = s["eval"]
    eval_args = ["eval", "--reference", str(teacher), "--out", str(work / "eval"), "--prompts", str(work / "eval_prompts.txt"),
                 "--num-prompts", str(e["num_prompts"]), "--steps", str(e["steps"]), "--resolution", str(s["resolution"]),
                 "--guidance", str(s["guidance"]), "--seed", str(e["seed"]), "--grid-rows", "2"]
    for folder in candidates.values():
        eval_args += ["--candidate", str(folder)]
    vqdm_cli(eval_args, log_dir=work)
    ev = json.loads((work / "eval" / "eval.json").read_text())
    ev = ev.get("results", ev)
    for label, folder in candidates.items():
        r = ev[str(folder)]
        rows[label].update({k: r[k] for k in ("unet_rel_mse", "latent_psnr", "psnr", "ssim")})


def judge_variants(teacher: Path, judge: DigitJudge, seeds: list[int], rows: dict, candidates: dict
                   ) -> tuple[dict[str, dict], dict[str, list]]:
    """Digit scores of dense and every candidate, plus a row of real digits; returns (rows, image grids)."""
    grids = {}
    rows = {"dense": {"method": "dense", "bits": 16, "bits_per_weight_quantized": 16.0, "unet_rel_mse": 0.0,
                      "latent_psnr": float("inf"), "psnr": float("inf"), "ssim": 1.0}, **rows}
    real = {"method": "real", "bits_per_weight_quantized": float("nan"), "unet_rel_mse": float("nan"),
                           "latent_psnr": float("nan"), "psnr": float("nan"),
                           "class_accuracy": float((judge.predict(judge.split.x_train[:10 * len(seeds)]) ==
                                                    judge.split.y_train[:10 * len(seeds)]).mean()),
                           "frechet_distance": feature_frechet_distance(judge.split.x_train[:10 * len(seeds)],
                                                                judge.split.x_test)}
    candidates = {"dense": teacher, **candidates}
    for label, folder in candidates.items():
        scores, grids[label] = judge_variant(folder, judge, seeds, judge.split.x_test)
        rows[label].update(scores)
        print(f"{label}: class accuracy {scores['class_accuracy']:.1%}, Fréchet distance {scores['frechet_distance']:.2f}",
              flush=True)
    rows["real digits (training set, same count)"] = real
    return rows, grids


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s = settings(args.quick, args.judge_seeds, Preset.from_name(DIGITS_PRESET))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vqdm-quality-trained-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    teacher = work / "dense"
    if not teacher.exists():
        shutil.copytree(args.model, teacher)
    train_prompts = training_prompts()
    (work / "train_prompts.txt").write_text("\n".join(train_prompts) + "\n")
    (work / "eval_prompts.txt").write_text("\n".join(digit_prompt(d) for d in range(10)) + "\n")
    common = ["--resolution", str(s["resolution"]), "--guidance", str(s["guidance"]),
              "--prompts", str(work / "train_prompts.txt")]

    rows: dict[str, dict] = {}
    candidates: dict[str, Path] = {}
    scalar_variants(teacher, work, s, train_prompts, rows, candidates)
    aq_variants(teacher, work, s, common, rows, candidates)
    eval_variants(teacher, work, s, rows, candidates)
    judge = DigitJudge()
    rows, grids = judge_variants(teacher, judge, s["judge_seeds"], rows, candidates)

    table = render_table(rows)
    print(table)
    report = {
        "command": "python benchmarks/quality_trained_tiny.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
                    platform.machine(), "threads": torch.get_num_threads()},
        "model": f"{DIGITS_PRESET} (trained by benchmarks/train_tiny.py)", "model_folder": args.model, "settings": s,
        "judge": {"classifier": "sklearn LogisticRegression(max_iter=5000), 8x8 digits / 16, 70/30 stratified split",
                  "test_accuracy": judge.test_accuracy, "round_trip_accuracy": judge.round_trip_accuracy(),
                  "images_per_variant": 10 * len(s["judge_seeds"])},
        "results": rows, "table_markdown": table, "seconds": time.perf_counter() - t_start,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, allow_nan=True))
    if args.png:
        labelled_grid(grids, args.png)
    return 0


def render_table(rows: dict[str, dict]) -> str:
    lines = ["| variant | bits/weight (quantized layers) | class accuracy | Fréchet distance (8×8) | U-Net rel. MSE | "
             "latent PSNR (dB) | image PSNR (dB) |", "|---|---|---|---|---|---|---|"]
    def f(v: float, spec: str) -> str:
        return "—" if v != v else ("∞" if v == float("inf") else format(v, spec))  # nan: not applicable

    for label, r in rows.items():
        lines.append(f"| {label} | {f(r['bits_per_weight_quantized'], '.2f')} | {r['class_accuracy']:.1%} | "
                     f"{r['frechet_distance']:.2f} | {f(r['unet_rel_mse'], '.4f')} | {f(r['latent_psnr'], '.2f')} | "
                     f"{f(r['psnr'], '.2f')} |")
    return "\n".join(lines)


def labelled_grid(grids: dict[str, list], path: str, scale: int = 3) -> None:
    """One row per variant (digits 0-9, first seed), its label on the left."""
    w, h = grids["dense"][0].size
    label_w = 130
    tile = w * scale
    out = Image.new("RGB", (label_w + 10 * tile, len(grids) * tile), "white")
    draw = ImageDraw.Draw(out)
    for r, (label, images) in enumerate(grids.items()):
        draw.text((4, r * tile + tile // 2 - 6), label, fill="black")
        for c, im in enumerate(images):
            out.paste(im.resize((tile, tile), Image.NEAREST), (label_w + c * tile, r * tile))
    out.save(path)


if __name__ == "__main__":
    sys.exit(main())
