"""What `vqdm eval` writes besides JSON: the Markdown tables and the image grid."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw


def to_uint8(img: torch.Tensor):
    """[3, H, W] in [0, 1] -> HxWx3 uint8 array."""
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def make_grid(columns: list[tuple[str, torch.Tensor]], rows: int, tile: int = 256):
    """PIL image: one column per (label, images [N, 3, H, W]), `rows` prompts, labels on top."""
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


def fmt(v, digits: int = 4) -> str:
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
    lines.append(f"| reference | 16 | — | — | — | — | — | — | {fmt(ref.get('clip_score'))} | "
                 f"{fmt(ref.get('pickscore'))} | {fmt(ref.get('fid'))} |")
    for name, m in results.items():
        cells = [fmt(m.get("bits_per_weight_unet"), 3)] + [fmt(m.get(k)) for k in (
            "unet_rel_mse", "latent_mse", "latent_psnr", "latent_ssim", "psnr", "ssim", "clip_score", "pickscore", "fid")]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    steps = [st["step"] for st in next(iter(results.values())).get("unet_rel_mse_per_step", [])] if results else []
    if steps:
        lines += ["", f"U-Net output relative MSE per denoising step (inputs from the reference trajectories of the "
                      f"first {meta['unet_mse_prompts']} prompts):", "",
                  "| model | " + " | ".join(f"step {k}" for k in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for name, m in results.items():
            lines.append(f"| `{name}` | " + " | ".join(fmt(st["rel_mse"], 3) for st in m["unet_rel_mse_per_step"]) + " |")
    if meta.get("notes"):
        lines += [""] + [f"- {n}" for n in meta["notes"]]
    path.write_text("\n".join(lines) + "\n")


def labels_for(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        label = str(p)
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out
