"""`vqdm eval`: how close compressed U-Nets are to a reference, on the same prompts and seeds.

For the reference and every candidate, one pipeline (the reference's scheduler, text encoders and
VAE; only the U-Net is swapped) samples every prompt with its seed. Reported per candidate:

    unet_rel_mse            Σ|ε_cand(x_t) − ε_ref(x_t)|² / Σ|ε_ref(x_t)|², the candidate fed the
                            reference trajectory's inputs (so errors do not compound), overall and
                            per denoising step (`unet_rel_mse_per_step`)
    latent_mse, latent_psnr, latent_ssim
                            final latents of free-running sampling vs the reference's (PSNR/SSIM
                            with data range = the reference latent's max − min, per image)
    psnr, ssim              decoded images in [0, 1] vs the reference's images
    clip_score, pickscore   mean cosine(image, prompt) with a local CLIP / PickScore model folder
                            (the scale of the paper's CLIP 0.356 / PickScore 0.226), when given
    fid                     against reference statistics (.npz mu/sigma), with local Inception weights

Writes DIR/eval.json ({candidate: {metric: value}}), DIR/eval_meta.json (settings, reference
scores), DIR/eval.md (Markdown tables) and DIR/grid.png (reference | candidates, one row a prompt).
Prompts stream through in chunks (all models sample a chunk, its metrics are added up, its images
dropped), so a 5,000-prompt COCO run holds one chunk of images at a time.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from vqdm.errors import ConfigError
from vqdm.models import Preset, detect_family, load_pipeline
from vqdm.quantizer.evaluate.image_metrics import psnr, ssim, ssim_window
from vqdm.quantizer.sampling import CalibrationConfig, load_prompts, plan_batches, prompts_digest
from vqdm.quantizer.unet_samples import SampleBank, SampleRecorder, sample_latents, unet_predictions

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    num_prompts: int = 8
    steps: int | None = None  # None: the family's default (SDXL 30, Turbo 4)
    guidance: float | None = None  # None: SDXL 5, Turbo 0
    resolution: int | None = None  # None: SDXL 1024, Turbo 512
    seed: int = 0
    prompts_file: str | None = None
    batch_size: int = 1  # prompts per pipeline call
    grid_rows: int = 4  # prompts shown in grid.png
    chunk_prompts: int = 8  # prompts sampled by every model before metrics are accumulated
    unet_mse_prompts: int = 64  # prompts whose reference trajectory feeds the teacher-forced U-Net error

    def resolved(self, family: str) -> "EvalConfig":
        p = Preset.from_name(family)
        return dataclasses.replace(self, steps=self.steps or p.steps,
                                   guidance=p.guidance if self.guidance is None else self.guidance,
                                   resolution=self.resolution or p.resolution)

    def sampling(self) -> CalibrationConfig:
        return CalibrationConfig(num_prompts=self.num_prompts, steps=self.steps, guidance=self.guidance,
                                 resolution=self.resolution, scheduler="native", batch_size=self.batch_size,
                                 seed=self.seed, prompts_file=self.prompts_file)


# -- pieces ----------------------------------------------------------------------------------------
@torch.no_grad()
def decode_images(pipe, latents: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Images [N, 3, H, W] float32 in [0, 1] (CPU) from final latents, through the VAE in fp32."""
    vae = pipe.vae
    cfg = vae.config
    dev = next(vae.parameters()).device
    out = []
    for i in range(0, len(latents), batch_size):
        z = latents[i:i + batch_size].to(dev, torch.float32)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:  # as the SDXL pipeline does when the VAE has them
            mean = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
            std = torch.tensor(std, device=dev).view(1, -1, 1, 1)
            z = z * std / cfg.scaling_factor + mean
        else:
            z = z / cfg.scaling_factor
        img = vae.decode(z, return_dict=False)[0]
        out.append((img.float() / 2 + 0.5).clamp(0, 1).cpu())
    return torch.cat(out)


def load_candidate_unet(path: Path, dtype: torch.dtype, device: str) -> tuple[nn.Module, dict]:
    """(U-Net, info) of an artifact (VQ) or a dense diffusers folder."""
    from vqdm.models.artifact import MANIFEST_FILE, load_vq_unet

    if (path / MANIFEST_FILE).is_file():
        unet, manifest = load_vq_unet(path, dtype=dtype, device=device)
        q = manifest["quantization"]
        dist = manifest.get("distillation") or {}
        return unet, {"kind": "vq", "method": q.get("method"), "num_codebooks": q.get("num_codebooks"),
                      "bits_per_weight_unet": manifest.get("bits_per_weight", {}).get("unet"),
                      "distilled": bool(dist), "distill_steps": dist.get("train_steps"),
                      "base_unet_sha256": (manifest.get("base_model") or {}).get("unet_sha256")}
    from diffusers import UNet2DConditionModel

    if not (path / "unet").is_dir():
        raise FileNotFoundError(f"{path}: neither a vqdm artifact nor a diffusers folder with a unet/ subfolder")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, local_files_only=True)
    return unet.to(device).eval(), {"kind": "dense", "bits_per_weight_unet": 16.0}  # SPEC §2 accounting: fp16


class ImageScorer:
    """cosine(image embedding, prompt embedding) per image with a local CLIP-architecture model folder.

    Works for CLIP (CLIP score, as the paper reports it: 0.357 for SDXL) and for PickScore (a CLIP-H
    fine-tune; the paper's 0.226 is this cosine: PickScore's logit_scale x cosine, divided by 100).
    """

    def __init__(self, model_dir: str | Path, device: str, batch_size: int = 16) -> None:
        from transformers import CLIPModel, CLIPProcessor

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: not a local transformers CLIP model folder (no config.json)")
        self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(model_dir, local_files_only=True)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from PIL import Image

        out = []
        for i in range(0, len(images), self.batch_size):
            pil = [Image.fromarray(to_uint8(img)) for img in images[i:i + self.batch_size]]
            inputs = self.processor(text=prompts[i:i + self.batch_size], images=pil, return_tensors="pt",
                                    padding=True, truncation=True)
            res = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
            out.append((res.image_embeds * res.text_embeds).sum(-1).float().cpu())  # both unit-norm
        return torch.cat(out)


@dataclass
class Tally:
    """One model's running sums over prompt chunks (nothing image-sized is kept but the grid rows)."""

    step_err: dict = field(default_factory=dict)  # step -> [Σ err², Σ ref², Σ t, samples]
    latent_sq: float = 0.0
    latent_numel: int = 0
    per_image: dict = field(default_factory=lambda: {k: [] for k in ("latent_psnr", "latent_ssim", "psnr", "ssim")})
    scores: dict = field(default_factory=dict)  # "clip_score" / "pickscore" -> per-image values
    features: list = field(default_factory=list)  # Inception features per chunk
    grid: list = field(default_factory=list)

    def add_unet(self, pred: torch.Tensor, bank: SampleBank) -> None:
        err = ((pred.double() - bank.target.double()) ** 2).flatten(1).sum(1)  # [S]
        ref = (bank.target.double() ** 2).flatten(1).sum(1)
        for k in bank.step.unique().tolist():
            sel = bank.step == k
            acc = self.step_err.setdefault(k, [0.0, 0.0, 0.0, 0])
            acc[0] += float(err[sel].sum())
            acc[1] += float(ref[sel].sum())
            acc[2] += float(bank.t[sel].sum())
            acc[3] += int(sel.sum())

    def add_pair(self, latents: torch.Tensor, ref_latents: torch.Tensor, images: torch.Tensor,
                 ref_images: torch.Tensor) -> None:
        self.latent_sq += float(((latents.double() - ref_latents.double()) ** 2).sum())
        self.latent_numel += latents.numel()
        lat_range = (ref_latents.flatten(1).amax(1) - ref_latents.flatten(1).amin(1)).clamp_min(1e-12)
        self.per_image["latent_psnr"] += psnr(latents, ref_latents, lat_range).tolist()
        self.per_image["latent_ssim"] += ssim(latents, ref_latents, lat_range).tolist()
        self.per_image["psnr"] += psnr(images, ref_images, 1.0).tolist()
        self.per_image["ssim"] += ssim(images, ref_images, 1.0).tolist()

    def add_images(self, images: torch.Tensor, prompts: list[str], scorers: dict, inception, grid_rows: int) -> None:
        for key, scorer in scorers.items():
            self.scores.setdefault(key, []).extend(scorer(images, prompts).tolist())
        if inception is not None:
            from vqdm.quantizer.evaluate.fid import inception_features

            self.features.append(inception_features(inception, images))
        self.grid += list(images[:max(0, grid_rows - len(self.grid))])

    def result(self, fid_stats) -> dict:
        out: dict = {}
        if self.step_err:
            total = [sum(v[i] for v in self.step_err.values()) for i in (0, 1)]
            out["unet_rel_mse"] = total[0] / total[1]
            out["unet_rel_mse_per_step"] = [{"step": k, "timestep": v[2] / v[3], "rel_mse": v[0] / v[1]}
                                            for k, v in sorted(self.step_err.items())]
        if self.latent_numel:
            out["latent_mse"] = self.latent_sq / self.latent_numel
            out.update({k: sum(v) / len(v) for k, v in self.per_image.items()})
        out.update({k: sum(v) / len(v) for k, v in self.scores.items()})
        if fid_stats is not None:
            from vqdm.quantizer.evaluate.fid import feature_statistics, frechet_distance

            out["fid"] = frechet_distance(*feature_statistics(torch.cat(self.features)), *fid_stats)
        return out


def to_uint8(img: torch.Tensor):
    """[3, H, W] in [0, 1] -> HxWx3 uint8 array."""
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def make_grid(columns: list[tuple[str, torch.Tensor]], rows: int, tile: int = 256):
    """PIL image: one column per (label, images [N, 3, H, W]), `rows` prompts, labels on top."""
    from PIL import Image, ImageDraw

    rows = min(rows, min(len(imgs) for _, imgs in columns))
    header = 18
    grid = Image.new("RGB", (tile * len(columns), header + tile * rows), "white")
    draw = ImageDraw.Draw(grid)
    for c, (label, imgs) in enumerate(columns):
        text = label if len(label) <= tile // 7 else "…" + label[-(tile // 7 - 1):]
        draw.text((c * tile + 4, 3), text, fill="black")
        for r in range(rows):
            tile_img = Image.fromarray(to_uint8(imgs[r])).resize((tile, tile), Image.Resampling.BILINEAR)
            grid.paste(tile_img, (c * tile, header + r * tile))
    return grid


# -- the command -----------------------------------------------------------------------------------
def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞"
        return f"{v:.{digits}g}"
    return str(v)


def write_markdown(path: Path, results: dict, meta: dict) -> None:
    s = meta["settings"]
    lines = [f"# vqdm eval — reference `{meta['reference']}`", "",
             f"{s['num_prompts']} prompts, {s['steps']} steps, guidance {s['guidance']}, {s['resolution']}², "
             f"seed {s['seed']}, scheduler {meta['scheduler']}; device {meta['device']}.", "",
             "| model | bits/w (U-Net) | U-Net rel. MSE | latent MSE | latent PSNR | latent SSIM | PSNR | SSIM | CLIP | "
             "PickScore | FID |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = meta["reference_scores"]
    lines.append(f"| reference | 16 | — | — | — | — | — | — | {_fmt(ref.get('clip_score'))} | "
                 f"{_fmt(ref.get('pickscore'))} | {_fmt(ref.get('fid'))} |")
    for name, m in results.items():
        cells = [_fmt(m.get("bits_per_weight_unet"), 3)] + [_fmt(m.get(k)) for k in (
            "unet_rel_mse", "latent_mse", "latent_psnr", "latent_ssim", "psnr", "ssim", "clip_score", "pickscore", "fid")]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    steps = [st["step"] for st in next(iter(results.values())).get("unet_rel_mse_per_step", [])] if results else []
    if steps:
        lines += ["", f"U-Net output relative MSE per denoising step (inputs from the reference trajectories of the "
                      f"first {meta['unet_mse_prompts']} prompts):", "",
                  "| model | " + " | ".join(f"step {k}" for k in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for name, m in results.items():
            lines.append(f"| `{name}` | " + " | ".join(_fmt(st["rel_mse"], 3) for st in m["unet_rel_mse_per_step"]) + " |")
    if meta.get("notes"):
        lines += [""] + [f"- {n}" for n in meta["notes"]]
    path.write_text("\n".join(lines) + "\n")


def _labels(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        label = str(p)
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def evaluate(reference: str | Path, candidates: list[str | Path], out: str | Path, cfg: EvalConfig | None = None, *,
             clip_model: str | Path | None = None, pickscore_model: str | Path | None = None,
             fid_stats: str | Path | None = None, inception: str | Path | None = None,
             device: str | None = None, dtype: torch.dtype | None = None, progress: bool = True) -> dict:
    """Compare `candidates` with `reference` (see module docstring); returns the eval.json dict.

    Prompts are processed in chunks of `cfg.chunk_prompts`: every model samples the chunk, metrics
    are accumulated and the images dropped, so memory does not grow with --num-prompts (5,000 COCO
    prompts at 1024² would be 60 GB of images per model). The teacher-forced U-Net error uses the
    first `cfg.unet_mse_prompts` prompts (rounded up to whole chunks).
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    reference, out = Path(reference), Path(out)
    cands = [Path(c) for c in candidates]
    if not cands:
        raise ConfigError("give at least one --candidate")
    if (fid_stats is None) != (inception is None):
        raise ConfigError("FID needs both --fid-stats (reference .npz with mu/sigma) and --inception (FID "
                          "Inception-v3 weights, .safetensors); vqdm downloads nothing")
    for c in cands:
        if not c.is_dir():
            raise FileNotFoundError(f"--candidate {c}: no such folder")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
    stats = net = None
    if fid_stats is not None:
        from vqdm.quantizer.evaluate.fid import load_inception, load_statistics

        stats, net = load_statistics(fid_stats), load_inception(inception, device)
    scorers = {key: ImageScorer(d, device) for key, d in (("clip_score", clip_model), ("pickscore", pickscore_model))
               if d is not None}

    family = detect_family(reference)
    cfg = (cfg or EvalConfig()).resolved(family)
    sampling = cfg.sampling()
    batches = plan_batches(sampling, load_prompts(cfg.prompts_file))
    prompts = [p for b in batches for p in b.prompts]

    pipe = load_pipeline(reference, dtype=dtype, device=device)
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)  # decode in fp32 (the SDXL VAE overflows in fp16)
    ref_unet = pipe.unet
    from vqdm.models.artifact import unet_fingerprint

    ref_sha = unet_fingerprint(source_dir=reference) if list((reference / "unet").glob("*.safetensors")) else None
    labels, unets, infos, notes = _labels(cands), {}, {}, []
    for label, path in zip(labels, cands):  # all loaded at once: each samples every chunk
        unets[label], info = load_candidate_unet(path, dtype, device)
        base = info.pop("base_unet_sha256", None)
        if base is not None and ref_sha is not None and base != ref_sha:
            notes.append(f"`{label}` was quantized from a different U-Net than the reference")
            log.warning("%s was quantized from a different U-Net than %s", path, reference)
        infos[label] = info
    tallies = {label: Tally() for label in ["reference", *labels]}

    per_chunk = max(1, cfg.chunk_prompts // cfg.batch_size)
    chunks = [batches[i:i + per_chunk] for i in range(0, len(batches), per_chunk)]
    bar = tqdm(total=len(batches) * (1 + len(cands)), desc="eval sampling", unit="batch", disable=not progress)
    done = mse_prompts = 0
    latent_hw = None
    for chunk in chunks:
        chunk_prompts = [p for b in chunk for p in b.prompts]
        bank = None
        if done < cfg.unet_mse_prompts:
            with SampleRecorder(ref_unet) as rec:
                ref_latents = sample_latents(pipe, sampling, chunk, recorder=rec, progress=bar)
            bank = rec.bank()
            mse_prompts += len(chunk_prompts)
        else:
            ref_latents = sample_latents(pipe, sampling, chunk, progress=bar)
        latent_hw = ref_latents.shape[-2:]
        ref_images = decode_images(pipe, ref_latents)
        tallies["reference"].add_images(ref_images, chunk_prompts, scorers, net, cfg.grid_rows)
        for label, unet in unets.items():
            pipe.unet = unet
            try:
                latents = sample_latents(pipe, sampling, chunk, progress=bar)
            finally:
                pipe.unet = ref_unet
            images = decode_images(pipe, latents)
            t = tallies[label]
            t.add_pair(latents, ref_latents, images, ref_images)
            t.add_images(images, chunk_prompts, scorers, net, cfg.grid_rows)
            if bank is not None:
                t.add_unet(unet_predictions(unet, bank, batch_size=max(1, cfg.batch_size)), bank)
        done += len(chunk_prompts)
    bar.close()

    results = {label: {**infos[label], **tallies[label].result(stats)} for label in labels}
    if stats is not None and len(prompts) < 2048:
        notes.append(f"FID over {len(prompts)} images is biased upward and noisy: compare models at the same N "
                     "only (the paper uses 5,000 COCO prompts)")
    meta = {
        "reference": str(reference), "family": family, "device": device, "dtype": str(dtype).replace("torch.", ""),
        "scheduler": type(pipe.scheduler).__name__, "settings": asdict(cfg), "unet_mse_prompts": mse_prompts,
        "prompts_sha256": prompts_digest(prompts), "prompts": prompts,
        "latent_ssim_window": ssim_window(*latent_hw), "reference_scores": tallies["reference"].result(stats),
        "notes": notes, "seconds": time.perf_counter() - t_start,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    (out / "eval_meta.json").write_text(json.dumps(meta, indent=2))
    write_markdown(out / "eval.md", results, meta)
    columns = [(label, torch.stack(t.grid)) for label, t in tallies.items()]
    make_grid(columns, cfg.grid_rows, tile=min(256, columns[0][1].shape[-1])).save(out / "grid.png")
    return results
