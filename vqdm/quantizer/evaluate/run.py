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

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image
from tqdm.auto import tqdm

from vqdm.errors import ConfigError
from vqdm.models import SingleFileOptions, base_unet_sha256, detect_family, is_checkpoint_file, load_pipeline
from vqdm.models.artifact import is_artifact, load_vq_unet
from vqdm.models.vae import vae_decode
from vqdm.quantizer.evaluate.config import EvalConfig, default_sampling
from vqdm.quantizer.evaluate.fid import (features_to_statistics_distance, inception_features, load_inception,
                                         load_statistics)
from vqdm.quantizer.evaluate.image_metrics import psnr, ssim, ssim_window
from vqdm.quantizer.evaluate.report import labels_for, make_grid, to_uint8, write_markdown
from vqdm.quantizer.runtime import default_device, default_dtype
from vqdm.quantizer.sampling import load_prompts, plan_batches, prompts_digest, run_trajectories
from vqdm.quantizer.unet_samples import SampleBank, SampleRecorder, unet_predictions

log = logging.getLogger(__name__)


# -- pieces ----------------------------------------------------------------------------------------
@torch.no_grad()
def decode_images(pipe, latents: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Images [N, 3, H, W] float32 in [0, 1] (CPU) from final latents, through the VAE in fp32."""
    out = []
    for i in range(0, len(latents), batch_size):
        img = vae_decode(pipe, latents[i:i + batch_size], torch.float32)
        out.append((img.float() / 2 + 0.5).clamp(0, 1).cpu())
    return torch.cat(out)


def load_candidate_unet(path: Path, dtype: torch.dtype, device: str) -> tuple[nn.Module, dict]:
    """(U-Net, info) of an artifact (VQ; folder or file) or a dense diffusers folder."""
    if is_artifact(path):
        unet, manifest = load_vq_unet(path, dtype=dtype, device=device)
        q = manifest["quantization"]
        dist = manifest.get("distillation") or {}
        return unet, {"kind": "vq", "method": q.get("method"), "num_codebooks": q.get("num_codebooks"),
                      "bits_per_weight_unet": manifest.get("bits_per_weight", {}).get("unet"),
                      "distilled": bool(dist), "distill_steps": dist.get("train_steps"),
                      "base_unet_sha256": (manifest.get("base_model") or {}).get("unet_sha256")}
    from diffusers import UNet2DConditionModel  # lazy: only for dense candidates; costs seconds

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
        from transformers import CLIPModel, CLIPProcessor  # lazy: only with --clip-model / --pickscore-model

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: not a local transformers CLIP model folder (no config.json)")
        self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(model_dir, local_files_only=True)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
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
            out["fid"] = features_to_statistics_distance(torch.cat(self.features), *fid_stats)
        return out


def evaluate(reference: str | Path, candidates: list[str | Path], out: str | Path, cfg: EvalConfig | None = None, *,
             clip_model: str | Path | None = None, pickscore_model: str | Path | None = None,
             fid_stats: str | Path | None = None, inception: str | Path | None = None,
             device: str | None = None, dtype: torch.dtype | None = None, progress: bool = True,
             single_file: SingleFileOptions | None = None) -> dict:
    """Compare `candidates` with `reference` (see module docstring); returns the eval.json dict.

    Prompts are processed in chunks of `cfg.chunk_prompts`: every model samples the chunk, metrics
    are accumulated and the images dropped, so memory does not grow with --num-prompts (5,000 COCO
    prompts at 1024² would be 60 GB of images per model). The teacher-forced U-Net error uses the
    first `cfg.unet_mse_prompts` prompts (rounded up to whole chunks).
    """
    t_start = time.perf_counter()
    reference, out = Path(reference), Path(out)
    cands = [Path(c) for c in candidates]
    check_args(cands, fid_stats, inception)
    device = default_device(device)
    dtype = default_dtype(dtype, device)
    stats = net = None
    if fid_stats is not None:
        stats, net = load_statistics(fid_stats), load_inception(inception, device)
    scorers = {key: ImageScorer(d, device) for key, d in (("clip_score", clip_model), ("pickscore", pickscore_model))
               if d is not None}

    family = detect_family(reference, single_file)
    cfg = cfg or EvalConfig(default_sampling(family))
    batches = plan_batches(cfg.sampling, load_prompts(cfg.sampling.prompts_file))
    prompts = [p for b in batches for p in b.prompts]

    pipe = load_pipeline(reference, dtype=dtype, device=device, single_file=single_file)
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)  # decode in fp32 (the SDXL VAE overflows in fp16)
    unets, infos, notes = _load_candidates(reference, cands, dtype, device)
    tallies = {label: Tally() for label in ["reference", *unets]}
    bar = tqdm(total=len(batches) * (1 + len(cands)), desc="eval sampling", unit="batch", disable=not progress)
    mse_prompts, latent_hw = _sample_chunks(pipe, unets, cfg, batches, tallies, scorers, net, bar)
    bar.close()

    results = {label: {**infos[label], **tallies[label].result(stats)} for label in unets}
    if stats is not None and len(prompts) < 2048:
        notes.append(f"FID over {len(prompts)} images is biased upward and noisy: compare models at the same N "
                     "only (the paper uses 5,000 COCO prompts)")
    meta = {
        "reference": str(reference), "family": family, "device": device, "dtype": str(dtype).replace("torch.", ""),
        "scheduler": type(pipe.scheduler).__name__, "settings": cfg.to_dict(), "unet_mse_prompts": mse_prompts,
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


def check_args(cands: list[Path], fid_stats, inception) -> None:
    if not cands:
        raise ConfigError("give at least one --candidate")
    if (fid_stats is None) != (inception is None):
        raise ConfigError("FID needs both --fid-stats (reference .npz with mu/sigma) and --inception (FID "
                          "Inception-v3 weights, .safetensors); vqdm downloads nothing")
    for c in cands:
        if not c.exists():
            raise FileNotFoundError(f"--candidate {c}: no such folder or file")


def _load_candidates(reference: Path, cands: list[Path], dtype: torch.dtype, device: str
                     ) -> tuple[dict[str, nn.Module], dict[str, dict], list[str]]:
    """(U-Nets by label, their info by label, notes); all loaded at once: each samples every chunk."""
    dense = is_checkpoint_file(reference) or list((reference / "unet").glob("*.safetensors"))
    ref_sha = base_unet_sha256(reference) if dense else None
    unets, infos, notes = {}, {}, []
    for label, path in zip(labels_for(cands), cands):
        unets[label], info = load_candidate_unet(path, dtype, device)
        base = info.pop("base_unet_sha256", None)
        if base is not None and ref_sha is not None and base != ref_sha:
            notes.append(f"`{label}` was quantized from a different U-Net than the reference")
            log.warning("%s was quantized from a different U-Net than %s", path, reference)
        infos[label] = info
    return unets, infos, notes


def _sample_chunks(pipe, unets: dict[str, nn.Module], cfg: EvalConfig, batches: list, tallies: dict[str, Tally],
                   scorers: dict, net, bar) -> tuple[int, tuple]:
    """Every model samples every chunk of prompts; metrics go into `tallies`. (U-Net-error prompts, latent size)."""
    sampling, ref_unet = cfg.sampling, pipe.unet
    per_chunk = max(1, cfg.chunk_prompts // sampling.batch_size)
    done = mse_prompts = 0
    latent_hw = None
    for chunk in (batches[i:i + per_chunk] for i in range(0, len(batches), per_chunk)):
        chunk_prompts = [p for b in chunk for p in b.prompts]
        bank = None
        if done < cfg.unet_mse_prompts:
            with SampleRecorder(ref_unet) as rec:
                ref_latents = run_trajectories(pipe, sampling, chunk, before_batch=rec.new_batch, progress=bar,
                                               keep_latents=True)
            bank = rec.bank()
            mse_prompts += len(chunk_prompts)
        else:
            ref_latents = run_trajectories(pipe, sampling, chunk, progress=bar, keep_latents=True)
        latent_hw = ref_latents.shape[-2:]
        ref_images = decode_images(pipe, ref_latents)
        tallies["reference"].add_images(ref_images, chunk_prompts, scorers, net, cfg.grid_rows)
        for label, unet in unets.items():
            pipe.unet = unet
            try:
                latents = run_trajectories(pipe, sampling, chunk, progress=bar, keep_latents=True)
            finally:
                pipe.unet = ref_unet
            images = decode_images(pipe, latents)
            t = tallies[label]
            t.add_pair(latents, ref_latents, images, ref_images)
            t.add_images(images, chunk_prompts, scorers, net, cfg.grid_rows)
            if bank is not None:
                t.add_unet(unet_predictions(unet, bank, batch_size=max(1, sampling.batch_size)), bank)
        done += len(chunk_prompts)
    return mse_prompts, latent_hw
