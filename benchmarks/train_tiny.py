"""Train the tiny SDXL-architecture digits model that the embedded default serves (quantized into its
prebuilt artifact by `benchmarks/make_embedded_artifact.py --force`: run that after training).

    python benchmarks/train_tiny.py [--out vqdm/models/pretrained/tiny-sdxl-digits] [--json FILE] [--png FILE]
                                    [--vae-steps N] [--unet-steps N] [--seed 0] [--threads 2]

Data: the training 70% of scikit-learn's 8×8 handwritten digits (`vqdm.quantizer.evaluate.digits.digit_split`;
the other 30% are held out for the judge and the Fréchet distance), upscaled bicubically to 64²,
dark ink on white. Model: the `tiny-sdxl-digits` preset (tiny-sdxl's U-Net and VAE, 8×8 latents,
text encoders over a 4,096-merge CLIP BPE). Its two text encoders stay frozen at their seeded
random init; the U-Net learns to read them through cross-attention and the pooled embedding.

1. VAE: reconstruction MSE + a small KL term, on latent samples (so the decoder tolerates the
   imprecise latents a sampler produces). Per-channel latent mean / std go into the VAE config
   (`latents_mean`, `latents_std`), which the SDXL pipeline and vqdm's runner apply when decoding.
2. U-Net: epsilon prediction on the preset's own noise schedule (scaled-linear betas, 1,000 steps),
   min-SNR-5 loss weights, prompts drawn from `PROMPT_TEMPLATES`, 10% of conditions zeroed (what
   the pipeline feeds as the negative for an empty prompt: classifier-free guidance), EMA weights.
3. Writes the fp16 diffusers folder, then judges samples from it (digits 0-9 × 2 seeds).

Everything is seeded (data order, init, noise); on one machine and thread count the run repeats
bit for bit. Torch's CPU kernels may differ across CPUs, so another machine gives a slightly
different (equally good) model.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vqdm.models import Preset, build_pipeline, load_pipeline
from vqdm.models.digits import DIGITS_MODEL_DIR, DIGITS_PRESET, PROMPT_TEMPLATES, digit_prompt
from vqdm.quantizer.evaluate.digits import DigitJudge, digit_split, digits_to_images, generate_digits, images_to_digits
from vqdm.quantizer.evaluate.fid import feature_frechet_distance
from PIL import Image

MIN_SNR_GAMMA = 5.0
DROP_CONDITION = 0.1
WARMUP_STEPS = 100


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, lr: float, kl_weight: float, gen: torch.Generator) -> list[float]:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    losses = []
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = (rec - x).square().mean() + kl_weight * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step}: loss {np.mean(losses[-100:]):.5f}", flush=True)
    return losses


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vae.eval()
    means, stds = [], []
    for i in range(0, len(images), 256):
        post = vae.encode(images[i:i + 256]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def text_conditions(pipe, num_templates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[10, T, 77, C] prompt embeddings and [10, T, P] pooled ones, from the pipeline's own encode_prompt."""
    embeds, pooled = [], []
    for d in range(10):
        e, _, p, _ = pipe.encode_prompt([digit_prompt(d, t) for t in range(num_templates)], device="cpu",
                                        num_images_per_prompt=1, do_classifier_free_guidance=False)
        embeds.append(e)
        pooled.append(p)
    return torch.stack(embeds), torch.stack(pooled)


def train_unet(unet, z_mean: torch.Tensor, z_std: torch.Tensor, labels: torch.Tensor, embeds: torch.Tensor,
               pooled: torch.Tensor, time_ids: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int, batch: int,
               lr: float, ema_decay: float, gen: torch.Generator, checkpoint=None, checkpoint_every: int = 0,
               cond_lr_mult: float = 1.0) -> tuple[dict, list[float]]:
    """Returns the EMA state dict and the per-step losses; calls `checkpoint(step, ema, losses)` every
    `checkpoint_every` steps. The learning rate is constant after a short warm-up, so the EMA weights
    at step N are exactly what a run with `--unet-steps N` ends with."""
    unet.train()
    # The layers that read the frozen text encoders learn faster: the digit is a small part of the
    # random encoders' output (about 13% of the pooled embedding's spread), and at the base rate
    # the U-Net took over 1,000 steps before its output depended on the prompt at all.
    cond = [p for n, p in unet.named_parameters() if n.startswith("add_embedding") or ".attn2.to_k" in n or ".attn2.to_v" in n]
    ids = {id(p) for p in cond}
    rest = [p for p in unet.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": cond, "lr": lr * cond_lr_mult}], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / WARMUP_STEPS))
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    n_templates = embeds.shape[1]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(z_mean), (batch,), generator=gen)
        z0 = z_mean[idx] + z_std[idx] * torch.randn(z_mean[idx].shape, generator=gen)
        tmpl = torch.randint(n_templates, (batch,), generator=gen)
        enc, pool = embeds[labels[idx], tmpl], pooled[labels[idx], tmpl]
        keep = (torch.rand(batch, generator=gen) >= DROP_CONDITION).float()
        enc, pool = enc * keep.view(-1, 1, 1), pool * keep.view(-1, 1)
        t = torch.randint(len(alphas_cumprod), (batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = unet(xt, t, encoder_hidden_states=enc,
                    added_cond_kwargs={"text_embeds": pool, "time_ids": time_ids.expand(batch, -1)}).sample
        w = snr[t].clamp(max=MIN_SNR_GAMMA) / snr[t]  # min-SNR weighting for epsilon prediction
        loss = ((pred - noise).square().mean(dim=(1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].lerp_(v, 1 - decay)
                else:
                    ema[k].copy_(v)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"unet step {step}: loss {np.mean(losses[-100:]):.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            unet.eval()
            checkpoint(step + 1, ema, losses)
            unet.train()
    unet.eval()
    return ema, losses


def save_folder(pipe, ema: dict, out: Path) -> int:
    """Write the pipeline with the EMA U-Net as an fp16 diffusers folder (replacing `out`); returns its bytes."""
    from diffusers import StableDiffusionXLPipeline  # deferred: diffusers is heavy, and only writing needs the class

    unet = copy.deepcopy(pipe.unet)
    unet.load_state_dict(ema)
    parts = {k: copy.deepcopy(v) for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    half = StableDiffusionXLPipeline(**{**pipe.components, **parts, "unet": unet}).to(torch.float16)
    if out.exists():
        shutil.rmtree(out)
    half.save_pretrained(out, safe_serialization=True)
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def judge_folder(folder: Path, judge: DigitJudge, many: bool, png: str | None = None) -> dict:
    """Score the written folder (fp16 on disk, run in fp32 as the server does): digits 0-9 × seeds 0, 1;
    with `many`, 200 more images (seeds 100-119) for the accuracy and the Fréchet distance."""
    pipe = load_pipeline(folder)
    imgs, labs = generate_digits(pipe, list(range(10)), [0, 1])
    out = {"generated_accuracy_0to9_x_seeds01": judge.accuracy(imgs, labs)}
    if png:
        save_grid(imgs, 10, png, scale=3)
    if many:
        more, more_labels = generate_digits(pipe, list(range(10)), list(range(100, 120)), batch_size=50)
        out.update({"generated_accuracy_200": judge.accuracy(more, more_labels),
                    "frechet_distance_200_vs_test": feature_frechet_distance(images_to_digits(more), judge.split.x_test),
                    "frechet_distance_real_train_vs_test": feature_frechet_distance(judge.split.x_train, judge.split.x_test),
                    "frechet_distance_real_train200_vs_test": feature_frechet_distance(judge.split.x_train[:200],
                                                                               judge.split.x_test)})
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DIGITS_MODEL_DIR), help="diffusers folder to write (replaced)")
    ap.add_argument("--json", help="write the training report here (rewritten at every checkpoint)")
    ap.add_argument("--png", help="write a grid of samples (digits 0-9 × seeds 0, 1) here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny ops on shared cores; more threads spin-wait)")
    ap.add_argument("--vae-steps", type=int, default=250)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-3)
    ap.add_argument("--unet-steps", type=int, default=600)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--unet-lr", type=float, default=1e-3)
    ap.add_argument("--cond-lr-mult", type=float, default=10.0,
                    help="learning-rate multiplier of the layers reading the text encoders (add_embedding, attn2 k/v)")
    ap.add_argument("--phrasings", type=int, default=len(PROMPT_TEMPLATES),
                    help="train on the first N prompt phrasings of vqdm.models.digits.PROMPT_TEMPLATES")
    ap.add_argument("--text-init-factor", type=float, default=None,
                    help="initializer_factor of the frozen random text encoders (default: the preset's)")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--checkpoint-every", type=int, default=0,
                    help="write --out, judge it and rewrite --json every N U-Net steps (what --unet-steps N would give)")
    ap.add_argument("--judge-only", action="store_true", help="no training: judge the folder at --out, merge into --json")
    return ap.parse_args(argv)


def judge_only(args: argparse.Namespace, out: Path, judge: DigitJudge, judge_info: dict) -> None:
    """--judge-only: judge the folder at `out` and merge the scores into --json."""
    report = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    report.setdefault("judge", {}).update({**judge_info, **judge_folder(out, judge, True, args.png)})
    print(json.dumps(report["judge"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def build_model(args: argparse.Namespace):
    """The seeded `tiny-sdxl-digits` pipeline with frozen text encoders; returns (preset, pipe)."""
    preset = Preset.from_name(DIGITS_PRESET)
    if args.text_init_factor is not None:
        for cfg in (preset.text_encoder, preset.text_encoder_2):
            cfg["initializer_factor"] = args.text_init_factor
    pipe = build_pipeline(preset, seed=args.seed)
    for enc in (pipe.text_encoder, pipe.text_encoder_2):
        enc.requires_grad_(False)
    return preset, pipe


@dataclasses.dataclass
class VaeFit:
    losses: list[float]
    seconds: float
    reconstruction_mse: float
    z_mean: torch.Tensor  # latent means and stds of the training images, normalised per channel
    z_std: torch.Tensor


def fit_vae(pipe, images: torch.Tensor, args: argparse.Namespace, gen: torch.Generator) -> VaeFit:
    """Train the VAE, record its per-channel latent mean / std in its config, return the normalised latents."""
    t0 = time.perf_counter()
    vae_losses = train_vae(pipe.vae, images, args.vae_steps, args.vae_batch, args.vae_lr, args.kl_weight, gen)
    vae_seconds = time.perf_counter() - t0
    z_mean, z_std = encode_latents(pipe.vae, images)
    ch_mean = z_mean.mean(dim=(0, 2, 3))
    ch_std = (z_mean - ch_mean.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3)).add(z_std.square().mean(dim=(0, 2, 3))).sqrt()
    # The pipeline decodes latents * latents_std / scaling_factor + latents_mean: train on the inverse.
    pipe.vae.register_to_config(latents_mean=ch_mean.tolist(), latents_std=ch_std.tolist(), scaling_factor=1.0)
    z_mean = (z_mean - ch_mean.view(1, -1, 1, 1)) / ch_std.view(1, -1, 1, 1)
    z_std = z_std / ch_std.view(1, -1, 1, 1)
    with torch.no_grad():
        rec = pipe.vae.decode(z_mean[:256] * ch_std.view(1, -1, 1, 1) + ch_mean.view(1, -1, 1, 1)).sample
    vae_rec_mse = float((rec - images[:256]).square().mean())
    print(f"vae: {vae_seconds:.0f}s, reconstruction MSE {vae_rec_mse:.5f}, latent mean {ch_mean.tolist()}, "
          f"std {ch_std.tolist()}", flush=True)
    return VaeFit(vae_losses, vae_seconds, vae_rec_mse, z_mean, z_std)


@dataclasses.dataclass
class Checkpointer:
    """Writes --out, judges it and rewrites --json; called by `train_unet` every --checkpoint-every steps."""
    args: argparse.Namespace
    argv: list[str] | None
    pipe: object
    judge: DigitJudge
    judge_info: dict
    vae: VaeFit
    train_images: int
    t_start: float  # the run's start
    t_unet: float  # the U-Net training's start
    side_seconds: float = 0.0  # writing and judging checkpoints: not training time

    def __call__(self, step: int, ema: dict, unet_losses: list[float], final: bool = False) -> None:
        args, out = self.args, Path(self.args.out)
        t_write = time.perf_counter()
        seconds = {"vae": self.vae.seconds, "unet": t_write - self.t_unet - self.side_seconds,
                   "total": t_write - self.t_start - self.side_seconds}
        size = save_folder(self.pipe, ema, out)
        print(f"step {step}: wrote {out} ({size / 1e6:.2f} MB) after {seconds['total']:.0f}s of training", flush=True)
        scores = judge_folder(out, self.judge, final,
                              args.png if final else (f"{args.png}.step{step}.png" if args.png else None))
        print(f"step {step}: judge {json.dumps(scores)}", flush=True)
        report = {
            "command": "python benchmarks/train_tiny.py " + " ".join(self.argv if self.argv is not None else sys.argv[1:]),
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
            "settings": vars(args), "unet_steps_done": step, "reproduce": f"--unet-steps {step}",
            "preset": DIGITS_PRESET, "prompt_templates": list(PROMPT_TEMPLATES[:args.phrasings]),
            "train_images": self.train_images,
            "seconds": seconds, "vae_reconstruction_mse": self.vae.reconstruction_mse,
            "loss": {"vae_last100": float(np.mean(self.vae.losses[-100:])), "unet_first100": float(np.mean(unet_losses[:100])),
                     "unet_last100": float(np.mean(unet_losses[-100:]))},
            "folder_bytes": size, "judge": {**self.judge_info, **scores},
        }
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2))
        self.side_seconds += time.perf_counter() - t_write


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    split = digit_split()
    judge = DigitJudge(split)
    judge_info = {"classifier": "sklearn LogisticRegression(max_iter=5000) on 8x8 digits / 16, 70/30 stratified split",
                  "test_accuracy": judge.test_accuracy, "round_trip_accuracy": judge.round_trip_accuracy()}
    if args.judge_only:
        judge_only(args, out, judge, judge_info)
        return 0
    t_start = time.perf_counter()

    preset, pipe = build_model(args)
    images = digits_to_images(split.x_train, size=preset.resolution)
    labels = torch.as_tensor(split.y_train, dtype=torch.long)
    vae = fit_vae(pipe, images, args, gen)

    embeds, pooled = text_conditions(pipe, args.phrasings)
    r = preset.resolution
    time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32)  # SDXL's size/crop conditioning
    write = Checkpointer(args, argv, pipe, judge, judge_info, vae, len(images), t_start, t_unet=time.perf_counter())
    ema, unet_losses = train_unet(pipe.unet, vae.z_mean, vae.z_std, labels, embeds, pooled, time_ids,
                                  pipe.scheduler.alphas_cumprod.float(), args.unet_steps, args.unet_batch,
                                  args.unet_lr, args.ema, gen, write, args.checkpoint_every, args.cond_lr_mult)
    write(args.unet_steps, ema, unet_losses, final=True)
    return 0


def save_grid(images: list, cols: int, path: str, scale: int = 1) -> None:
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    grid.save(path)


if __name__ == "__main__":
    sys.exit(main())
