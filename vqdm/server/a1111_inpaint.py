"""AUTOMATIC1111's inpainting options as pure image math (PIL / numpy), applied to an upload in the
decode worker thread (`a1111.py` hands `prepare` to `uploads.decode_edit`) and to the generated
picture by `edit_pipeline.paste_back`:

- "Inpaint area: only masked" (`inpaint_full_res`): the mask's bounding box plus a padding,
  grown to the generation size's aspect ratio and kept inside the picture, is cut out and resized
  to the generation size; the inpainted crop is resized back and pasted into the full-size source
  through the (blurred) mask, so the reply has the source's size and the masked detail is drawn at
  the model's full resolution.
- "Masked content: fill" (`inpainting_fill` 0): the masked pixels start from the colours around
  them, spread inwards (pull-push: averages of the kept pixels over ever coarser blocks, blended
  back in from the coarsest), instead of from the source's own pixels (1, "original"). The
  latent fills (2, 3) are marked on the EditInput here and done on the latents by
  `edit_pipeline.latent_fill`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from vqdm.server.edit_pipeline import EditInput

Box = tuple[int, int, int, int]  # left, top, right, bottom: PIL's crop box, right and bottom exclusive


@dataclass(eq=False)
class Overlay:
    """Where an inpainted picture goes: resized to `box`'s size, into `source` at `box`, through
    `mask` (255 = the generated pixel, 0 = the source's, soft at a blurred edge)."""

    source: Image.Image  # RGB, the output's size
    mask: Image.Image  # L, the output's size
    box: Box

    def paste(self, generated: Image.Image) -> Image.Image:
        return paste_into(self.source, generated, self.box, self.mask)


def mask_box(mask: Image.Image, padding: int) -> Box | None:
    """The smallest box holding every non-zero mask pixel, grown by `padding` on each side within the
    picture; None for an all-zero mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    w, h = mask.size
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, w), min(y2 + padding, h)


def _grow(lo: int, hi: int, length: int, limit: int) -> tuple[int, int]:
    """[lo, hi) grown about its middle to `length`, shifted back inside [0, limit), cut at its ends
    when `length` is over `limit`."""
    extra = length - (hi - lo)
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    shift = max(0, -lo) - max(0, hi - limit)
    return max(lo + shift, 0), min(hi + shift, limit)


def fit_aspect(box: Box, width: int, height: int, image_size: tuple[int, int]) -> Box:
    """`box` grown along one axis to width:height (a 128x32 box for a 512x512 generation becomes
    128x128), inside an image of `image_size`; a picture too small for that keeps what fits (the
    crop is then stretched to the generation size, and back)."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    if bw * height > bh * width:  # too wide for width:height: taller
        y1, y2 = _grow(y1, y2, round(bw * height / width), image_size[1])
    else:
        x1, x2 = _grow(x1, x2, round(bh * width / height), image_size[0])
    return x1, y1, x2, y2


def only_masked(image: Image.Image, mask: Image.Image, width: int, height: int,
                padding: int) -> tuple[Image.Image, Image.Image, Overlay] | None:
    """A1111's "only masked": the crop of `image` and `mask` (both full-size) to generate at
    width x height, and the overlay that puts the result back; None for an all-zero mask."""
    box = mask_box(mask, padding)
    if box is None:
        return None
    box = fit_aspect(box, width, height, image.size)
    size = (width, height)
    crop = image.crop(box).resize(size, Image.LANCZOS)
    crop_mask = mask.crop(box).resize(size, Image.LANCZOS)
    return crop, crop_mask, Overlay(source=image, mask=mask, box=box)


def paste_into(source: Image.Image, generated: Image.Image, box: Box, mask: Image.Image) -> Image.Image:
    """`generated` resized into `box` of `source`, kept only where `mask` says (blending where it
    is soft); outside the mask every pixel is the source's."""
    x1, y1, x2, y2 = box
    layer = source.copy()
    layer.paste(generated.convert("RGB").resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
    return Image.composite(layer, source, mask)


def _halve(colour: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One pull step: 2x2 blocks summed (odd edges padded with weight 0), the weight capped at 1 and
    the premultiplied colour scaled with it, so a block's colour is the mean of what it holds."""
    h, w = weight.shape
    ph, pw = h % 2, w % 2
    colour = np.pad(colour, ((0, ph), (0, pw), (0, 0)))
    weight = np.pad(weight, ((0, ph), (0, pw)))
    hh, hw = colour.shape[0] // 2, colour.shape[1] // 2
    c = colour.reshape(hh, 2, hw, 2, 3).sum(axis=(1, 3))
    wt = weight.reshape(hh, 2, hw, 2).sum(axis=(1, 3))
    capped = np.minimum(wt, 1.0)
    scale = np.divide(capped, wt, out=np.zeros_like(wt), where=wt > 0)
    return c * scale[..., None], capped


def _double(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear 2x upsampling (each new pixel 3/4 its own cell, 1/4 the next; edges repeated), cut to
    `shape`."""
    for axis in (0, 1):
        prev = np.concatenate([a.take([0], axis), a.take(range(a.shape[axis] - 1), axis)], axis)
        nxt = np.concatenate([a.take(range(1, a.shape[axis]), axis), a.take([-1], axis)], axis)
        even, odd = 0.75 * a + 0.25 * prev, 0.75 * a + 0.25 * nxt
        a = np.stack([even, odd], axis + 1).reshape(*a.shape[:axis], -1, *a.shape[axis + 1:])
    return a[:shape[0], :shape[1]]


def diffuse_fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": each masked pixel (255) takes the colour spread in from the pixels around it,
    a partly masked one a blend of its own and that; unmasked pixels are unchanged. A mask over the
    whole picture leaves nothing to spread from: the image is returned as it is."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    keep = 1.0 - np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    if not keep.any():
        return image.convert("RGB")
    levels = [(rgb * keep[..., None], keep)]
    while levels[-1][1].size > 1:
        levels.append(_halve(*levels[-1]))
    colour, weight = levels[-1]
    estimate = colour / weight[..., None]  # the coarsest level is one cell, and some pixel is kept
    for colour, weight in reversed(levels[:-1]):
        estimate = colour + (1.0 - weight[..., None]) * _double(estimate, weight.shape)
    return Image.fromarray(np.clip(np.rint(estimate), 0, 255).astype(np.uint8))


def inpaint_input(edit: EditInput, size: tuple[int, int] | None, padding: int, fill: int) -> EditInput:
    """A decoded A1111 edit made ready for the pipeline. `size`: "only masked" at that generation
    size (`edit` is then at the upload's own size) or None, the whole picture; `fill`: the masked
    content, 0 "fill", 1 "original", 2 "latent noise", 3 "latent nothing" (the last two are done on
    the latents, by `edit_pipeline`). Without a mask, or with a blank one under "only masked"
    (nothing to cut out: A1111 then runs plain img2img of the picture), it is img2img."""
    if edit.mask is None:
        return edit
    image, mask, overlay = edit.image, edit.mask, None
    if size is not None:
        cut = only_masked(image, mask, *size, padding)
        if cut is None:
            return EditInput(image=image.resize(size, Image.LANCZOS), mask=None, strength=edit.strength)
        image, mask, overlay = cut
    if fill == 0:  # the pipeline starts from the filled pixels; the source, unfilled, is what is pasted onto
        overlay = overlay or Overlay(source=image, mask=mask, box=(0, 0, *image.size))
        image = diffuse_fill(image, mask)
    return EditInput(image=image, mask=mask, strength=edit.strength, overlay=overlay,
                     latent_fill=fill if fill in (2, 3) else None)
