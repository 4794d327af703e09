"""The sizes a served model was trained to draw, and the size policy that decides a request for
another size (docs/server.md, "Model names and sizes").

A diffusion U-Net draws well only near the sizes it was trained at: the embedded digits model,
trained at 32², asked for 1024² draws noise. Each model states its trained sizes (`/v1/models`
`trained_sizes`) and one policy decides the rest:

- `nearest`: generate at the trained size nearest the asked one (aspect ratio first, then area)
  and resize the images to the asked size; the reply says so (`generated_size`);
- `refuse`: 400 listing the trained sizes;
- `any`: generate at the asked size.

The asked size is checked against the server's limits (`min_side`, ...); the generated size is the
model's own (the embedded 32² is below the default `min_side` of 64). Jobs batch by the generated
size (`GenerationParams.batch_key`); the resize runs in the device's worker thread after the VAE
decode (`runner.run_batch`), never on the event loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from vqdm.server.loader import ServedModel

Size = tuple[int, int]  # (width, height) in pixels

# SDXL's multi-aspect fine-tuning buckets, as tabulated in the SDXL paper (Podell et al. 2023,
# "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis", arXiv:2307.01952,
# appendix "Multi-Aspect Training"): about 1024² pixels each, sides multiples of 64, from 1:4 to
# 4:1. The wide half (width > height) is listed; the square and the tall half complete it.
_SDXL_WIDE = ((2048, 512), (1984, 512), (1920, 512), (1856, 512), (1792, 576), (1728, 576), (1664, 576),
              (1600, 640), (1536, 640), (1472, 704), (1408, 704), (1344, 704), (1344, 768), (1280, 768),
              (1216, 832), (1152, 832), (1152, 896), (1088, 896), (1088, 960), (1024, 960))
SDXL_SIZES: tuple[Size, ...] = (*_SDXL_WIDE, (1024, 1024), *((h, w) for w, h in reversed(_SDXL_WIDE)))
# SDXL-Turbo was distilled at 512² only (its model card, "Limitations": "The generated images are of a
# fixed resolution (512x512 pix)").
TURBO_SIZES: tuple[Size, ...] = ((512, 512),)
FAMILY_SIZES = {"sdxl": SDXL_SIZES, "sdxl-turbo": TURBO_SIZES}

POLICIES = ("nearest", "refuse", "any")


def trained_sizes(family: str, native: Size) -> tuple[Size, ...]:
    """The sizes a model of `family` whose U-Net's native size (sample_size x 8) is `native` was
    trained at: the family's list when its native size is on it (a real SDXL or SDXL-Turbo); else
    the native size alone (the embedded digits model: 32², its preset's resolution; tiny presets)."""
    sizes = FAMILY_SIZES.get(family, ())
    return sizes if native in sizes else (native,)


def effective_policy(setting: str, source: str) -> str:
    """`size_policy` auto is `nearest` for the embedded demo (stock clients ask it for 1024²) and
    `any` for everything else (real SDXL draws usable images off its buckets)."""
    if setting == "auto":
        return "nearest" if source == "embedded" else "any"
    return setting


def nearest_size(asked: Size, sizes: tuple[Size, ...]) -> Size:
    """The size in `sizes` closest to `asked` in aspect ratio, then in area (both on a log scale, so
    twice and half count the same); ties go to the smaller size."""
    w, h = asked

    def distance(size: Size) -> tuple:
        sw, sh = size
        aspect = abs(math.log((sw / sh) / (w / h)))
        area = abs(math.log((sw * sh) / (w * h)))
        return round(aspect, 9), round(area, 9), sw * sh, size

    return min(sizes, key=distance)


def size_names(sizes: tuple[Size, ...]) -> list[str]:
    return [f"{w}x{h}" for w, h in sizes]


class SizeRefused(ValueError):
    """A size the model was not trained for, under policy `refuse`; the message lists the sizes."""


@dataclass(frozen=True)
class SizePlan:
    asked: Size  # what the reply holds
    generated: Size  # what the pipeline draws

    @property
    def resize_to(self) -> Size | None:
        """The size the generated images are resized to; None when they are already it."""
        return None if self.asked == self.generated else self.asked


def plan_size(asked: Size, sizes: tuple[Size, ...], policy: str) -> SizePlan:
    """Where to generate a request for `asked` on a model trained at `sizes` under `policy`."""
    if asked in sizes or policy == "any":
        return SizePlan(asked, asked)
    if policy == "refuse":
        raise SizeRefused(f"size {asked[0]}x{asked[1]} is not one this model was trained for; ask for one of "
                          f"{', '.join(size_names(sizes))} (this server's size_policy is refuse)")
    return SizePlan(asked, nearest_size(asked, sizes))


def plan_for(asked: Size, model: "ServedModel") -> SizePlan:
    return plan_size(asked, model.trained_sizes, model.size_policy)


def resized(images: list, size: Size | None) -> list:
    """PIL images at `size` (LANCZOS); the same list when `size` is None. Blocking: worker thread."""
    if size is None:
        return images
    return [im if im.size == size else im.resize(size, Image.LANCZOS) for im in images]
