"""Quality on a tiny SDXL-architecture model: dense vs RTN / GPTQ / AQ, AQ before and after distillation.

    python benchmarks/quality_tiny.py [--json FILE] [--png FILE] [--workdir DIR] [--quick] [--random-init]

Every method replaces the same layers (`select_layers`, SPEC §2): RTN and GPTQ write their
dequantized scalar weights into a dense copy of the model; AQ runs `vqdm quantize`'s driver
(7 subsets, calibration on the model's own trajectories) and `distill` recovers it. All of them are
then compared with the dense model by `vqdm eval` on held-out prompts and seeds: U-Net output
relative MSE on the reference trajectory, final-latent MSE / PSNR / SSIM, image PSNR / SSIM.

The model is the trained `tiny-sdxl-digits` that ships with vqdm (benchmarks/train_tiny.py; 32²,
prompts "a handwritten digit 7" and other phrasings; the eval prompts are the digits with seeds
never used for calibration or distillation). `--random-init` runs the old proxy instead: tiny-sdxl
with seeded random weights at 128² on the packaged prompts, whose outputs are noise.
benchmarks/quality_trained_tiny.py adds scores of the drawn digits themselves (a scikit-learn
classifier, Fréchet distance). Caveat either way: the layers are small (d = 32..1152), so AQ's
codebooks are a large share of the bits.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from vqdm.kernels import conv_weight_from_matrix
from vqdm.models import Preset, detect_family, load_pipeline, make_model, select_layers, weight_matrix
from vqdm.quantizer import gptq_quantize, rtn_quantize
from vqdm.quantizer.distill.recipes import recipe as distill_recipe
from vqdm.quantizer.distill.run import distill
from vqdm.quantizer.quantize.run import quantize_model
from vqdm.quantizer.evaluate.run import EvalConfig, evaluate
from vqdm.quantizer.quantize.hessians import collect_hessians
from vqdm.quantizer.recipes import recipe
from vqdm.quantizer.sampling import load_prompts
from vqdm.models.digits import DIGITS_MODEL_DIR, DIGITS_PRESET, digit_prompt, training_prompts


def scalar_group(d: int, largest: int = 128) -> int:
    """Largest power-of-two group <= `largest` dividing d (tiny layers are narrower than 128)."""
    g = largest
    while d % g:
        g //= 2
    return g


def scalar_baseline(teacher: Path, out: Path, method: str, bits: int, hessians: dict | None) -> dict:
    """A dense folder whose selected layers hold RTN / GPTQ dequantized weights; returns its stats."""
    pipe = load_pipeline(teacher)
    t0 = time.perf_counter()
    weights = bit_weights = 0.0
    for name, m in select_layers(pipe.unet):
        w = weight_matrix(m).detach().float()
        g = scalar_group(w.shape[1])
        wq = rtn_quantize(w, bits=bits, group_size=g) if method == "rtn" else \
            gptq_quantize(w, hessians[name].float(), bits=bits, group_size=g)
        conv = isinstance(m, torch.nn.Conv2d)  # matrix columns are (k_h, k_w, C_in): back to a conv weight
        with torch.no_grad():
            m.weight.copy_(conv_weight_from_matrix(wq, m.in_channels, m.kernel_size) if conv else wq)
        weights += w.numel()
        bit_weights += w.numel() * (bits + 32 / g)  # fp16 scale + zero per group
    seconds = time.perf_counter() - t0
    pipe.save_pretrained(out, safe_serialization=True)
    return {"bits_per_weight_quantized": bit_weights / weights, "quantize_seconds": seconds}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--png", help="write a bar chart of the table here")
    ap.add_argument("--workdir", help="keep the models here (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="fewer prompts and steps (a smoke run)")
    ap.add_argument("--random-init", action="store_true",
                    help="the old proxy: tiny-sdxl with random weights (noise images) instead of the trained digits model")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models on shared cores)")
    return ap.parse_args(argv)


def settings(quick: bool, trained: bool) -> dict:
    return {  # every setting in one place, recorded in the JSON
        "resolution": Preset.from_name(DIGITS_PRESET).resolution if trained else 128,
        "calibration": dict(num_prompts=8 if quick else 32, steps=4 if quick else 10, batch_size=4),
        "aq": dict(beam_size=8, adam_steps=20 if quick else 100, max_rounds=2 if quick else 10,
                   init_passes=0, relative_tolerance=0.01),  # the AQ defaults its table was measured with
        "distill": dict(num_prompts=16 if quick else 64, rounds=2, steps=4 if quick else 10, train_steps=20 if quick else 200,
                        batch_size=4, grad_accum=4, lr=2e-5, lr_codebooks=2e-5, lr_scales=2e-5,
                        gen_batch_size=4, test_prompts=0, allow_worse=True),  # the earlier table's settings
        "eval": dict(num_prompts=4 if quick else 16, steps=4 if quick else 20, seed=1000),
    }


def prepare_workdir(work: Path, trained: bool, eval_prompts: int) -> Path:
    """The dense teacher in work/dense (kept if there) and the training and eval prompt files; returns the teacher."""
    teacher = work / "dense"
    if not teacher.exists():
        if trained:
            shutil.copytree(DIGITS_MODEL_DIR, teacher)
        else:
            make_model("tiny-sdxl", teacher, seed=0)
    if trained:  # every phrasing to calibrate and distill; the eval seeds (1000 + i) are never used there
        prompts = training_prompts()
        held_out = [digit_prompt(d % 10) for d in range(eval_prompts)]
        train = prompts
    else:
        prompts = load_prompts(None)
        held_out = prompts[-eval_prompts:]  # eval prompts: never used to calibrate or distill
        train = prompts[:-len(held_out)]
    (work / "train_prompts.txt").write_text("\n".join(train) + "\n")
    (work / "eval_prompts.txt").write_text("\n".join(held_out) + "\n")
    return teacher


def scalar_variants(teacher: Path, work: Path, calib, train_file: str, rows: dict, candidates: dict) -> None:
    """RTN 4-bit, GPTQ 4- and 3-bit folders, added to `rows` and `candidates`.

    GPTQ's H: one pass over the dense model (not subset by subset like AQ)."""
    pipe = load_pipeline(teacher)
    names = [n for n, _ in select_layers(pipe.unet)]
    hessians = collect_hessians(pipe, names, calib, load_prompts(train_file)).hessians
    del pipe
    for method, bits in (("rtn", 4), ("gptq", 4), ("gptq", 3)):
        label = f"{method.upper()}-{bits}bit"
        folder = work / label
        rows[label] = {"method": method, "bits": bits, **scalar_baseline(teacher, folder, method, bits, hessians)}
        candidates[label] = folder
        print(f"{label}: done", flush=True)
    del hessians


def aq_variants(teacher: Path, work: Path, calib, s: dict, train_file: str, rows: dict, candidates: dict) -> None:
    """AQ K = 4, 3, 2 and each distilled, added to `rows` and `candidates`; folders already in `work` are reused."""
    for k in (4, 3, 2):
        label = f"AQ-{k}bit"
        folder = work / label
        t0 = time.perf_counter()
        reused = folder.exists()  # --workdir of an earlier run: its seconds are in that run's JSON
        if not reused:
            quantize_model(teacher, "sdxl", k, folder, calibration=calib, aq_options=s["aq"], progress=False)
        manifest = json.loads((folder / "unet" / "manifest.json").read_text())
        rows[label] = {"method": "aq", "bits": k, "bits_per_weight_quantized": manifest["bits_per_weight"]["quantized"],
                       "quantize_seconds": None if reused else time.perf_counter() - t0, "reused": reused}
        candidates[label] = folder
        print(f"{label}: quantized", flush=True)
        dlabel = f"{label}+distill"
        dfolder = work / dlabel
        t0 = time.perf_counter()
        reused = dfolder.exists()
        if not reused:
            cfg = distill_recipe("sdxl").replace(resolution=s["resolution"], prompts_file=train_file, **s["distill"])
            distill(teacher, folder, dfolder, cfg, progress=False)
        dist = json.loads((dfolder / "unet" / "manifest.json").read_text())["distillation"]
        rows[dlabel] = {**rows[label], "distill_seconds": None if reused else time.perf_counter() - t0, "reused": reused,
                        "distill_loss_first": dist["loss_first"], "distill_loss_last": dist["loss_last"]}
        candidates[dlabel] = dfolder
        print(f"{dlabel}: distilled", flush=True)


def evaluate_variants(teacher: Path, work: Path, s: dict, rows: dict, candidates: dict) -> None:
    """`vqdm eval` of every candidate against the dense teacher; its figures go into `rows`."""
    ecfg = EvalConfig.for_family(detect_family(teacher), num_prompts=s["eval"]["num_prompts"], steps=s["eval"]["steps"],
                                 resolution=s["resolution"], seed=s["eval"]["seed"],
                                 prompts_file=str(work / "eval_prompts.txt"), grid_rows=2)
    results = evaluate(teacher, list(candidates.values()), work / "eval", ecfg, progress=False)
    for label, folder in candidates.items():
        r = results[str(folder)]
        rows[label].update({k: r[k] for k in ("unet_rel_mse", "latent_mse", "latent_psnr", "latent_ssim", "psnr", "ssim")})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    trained = not args.random_init
    s = settings(args.quick, trained)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vqdm-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    teacher = prepare_workdir(work, trained, s["eval"]["num_prompts"])
    train_file = str(work / "train_prompts.txt")

    calib = recipe("sdxl").replace(resolution=s["resolution"], prompts_file=train_file, **s["calibration"])
    rows: dict[str, dict] = {}
    candidates: dict[str, Path] = {}
    scalar_variants(teacher, work, calib, train_file, rows, candidates)
    aq_variants(teacher, work, calib, s, train_file, rows, candidates)
    evaluate_variants(teacher, work, s, rows, candidates)

    table = render_table(rows)
    print(table)
    report = {
        "command": "python benchmarks/quality_tiny.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
                    platform.machine(), "threads": torch.get_num_threads()},
        "model": f"{DIGITS_PRESET} (trained, shipped)" if trained else "tiny-sdxl (random init, seed 0)",
        "settings": s, "results": rows, "table_markdown": table, "seconds": time.perf_counter() - t_start,
        "caveat": "tiny layers: codebooks dominate AQ's bits" if trained else "random-init tiny model: a weak proxy for real quality",
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.png:
        plot(rows, args.png)
    return 0


def render_table(rows: dict[str, dict]) -> str:
    lines = ["| method | bits/w (quantized layers) | U-Net rel. MSE | latent MSE | latent PSNR (dB) | latent SSIM | "
             "image PSNR (dB) | image SSIM |", "|---|---|---|---|---|---|---|---|",
             "| dense (fp32) | 32 | 0 | 0 | ∞ | 1 | ∞ | 1 |"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['bits_per_weight_quantized']:.2f} | {r['unet_rel_mse']:.4f} | {r['latent_mse']:.4f} | "
                     f"{r['latent_psnr']:.2f} | {r['latent_ssim']:.3f} | {r['psnr']:.2f} | {r['ssim']:.3f} |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: str) -> None:
    import matplotlib  # deferred: only --png needs it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in ((axes[0], "unet_rel_mse", "U-Net output rel. MSE (lower is better)"),
                           (axes[1], "latent_psnr", "final-latent PSNR, dB (higher is better)"),
                           (axes[2], "ssim", "image SSIM (higher is better)")):
        colors = ["#888" if r["method"] != "aq" else ("#2a7" if "distill" in label else "#27a")
                  for label, r in rows.items()]
        ax.bar(range(len(labels)), [rows[label][key] for label in labels], color=colors)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.suptitle("tiny SDXL vs dense: scalar baselines (grey), AQ (blue), AQ + distillation (green)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    sys.exit(main())
