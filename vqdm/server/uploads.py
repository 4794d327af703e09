"""The files uploaded to POST /v1/images/edits, decoded into the EditInput a queued edit keeps, and
what `size` auto means for an edit.

`decode_edit` runs in a worker thread (`edits.py` calls it through anyio.to_thread, at most
`edit_decode_concurrency` at a time): decoding, EXIF orientation, conversion and the LANCZOS resize
of a 4096² upload cost CPU seconds that, on the event loop, stalled every other request, /healthz
included. It returns only the resized EditInput, so the upload's bytes and its full-size pixels are
freed before the job queues.

Every refusal is an APIError naming the file (`param` image or mask): a file that is not PNG, JPEG
or WEBP, one over `max_image_pixels` (checked from its header, before any pixel is decoded), one
that does not decode.
"""
from __future__ import annotations

import ctypes
import math
from typing import BinaryIO, Callable

from PIL import Image, ImageFilter, ImageOps

from vqdm.server.edit_pipeline import EditInput, mask_from
from vqdm.server.errors import APIError, bad_request
from vqdm.server.settings import Settings
from vqdm.server.sizes import SizePlan
from vqdm.server.validation import size_problem

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def _too_many_pixels(param: str, pixels: str, max_pixels: int) -> APIError:
    return bad_request(f"{param} is {pixels} pixels; this server's limit is {max_pixels} (max_image_pixels): send a "
                "smaller picture", param, "image_too_large")


def open_upload(file: BinaryIO, param: str, max_pixels: int) -> Image.Image:
    """One uploaded PNG / JPEG / WEBP, decoded and turned as a viewer shows it (EXIF orientation);
    anything else, or anything over max_pixels, is refused from its header before its pixels."""
    file.seek(0)
    try:
        img = Image.open(file)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL's own check (from Image.MAX_IMAGE_PIXELS = max_pixels): it raises above twice the
        # limit, and only warns between 1x and 2x, where the check below refuses.
        raise _too_many_pixels(param, f"more than {2 * max_pixels}", max_pixels) from None
    except Exception:  # PIL raises many types on hostile headers; none of them is the server's fault
        raise bad_request(f"{param} is not an image vqdm can read (send PNG, JPEG or WEBP)", param, "invalid_image") from None
    if img.format not in IMAGE_FORMATS:
        raise bad_request(f"{param} is {img.format}; send PNG, JPEG or WEBP", param, "unsupported_image_format")
    w, h = img.size
    if w * h > max_pixels:
        raise _too_many_pixels(param, f"{w}x{h} = {w * h}", max_pixels)
    try:
        img.load()
        # A phone photo is stored sideways with an EXIF orientation: edit it the way it is displayed.
        ImageOps.exif_transpose(img, in_place=True)  # in place: no second full-size copy
        return img
    except Exception as e:  # truncated, corrupt, or a mode PIL cannot decode
        raise bad_request(f"{param} could not be decoded (truncated or corrupt?): {e}", param, "invalid_image") from None


def _converted(convert: Callable[[], Image.Image], param: str, mode: str) -> Image.Image:
    try:
        return convert()
    except Exception as e:  # an exotic mode without a conversion path
        raise bad_request(f"{param} of mode {mode} cannot be converted: {e}; send 8-bit RGB, RGBA or L", param,
                   "invalid_image") from None


def decode_edit(image: BinaryIO, mask: BinaryIO | None, size_for: Callable[[int, int], SizePlan],
                strength: float, max_pixels: int, mask_rule: Callable[[Image.Image], Image.Image] = mask_from,
                names: tuple[str, str] = ("image", "mask"), mask_blur: float = 0,
                prepare: Callable[[EditInput], EditInput] | None = None) -> tuple[EditInput, SizePlan]:
    """The EditInput of one request: image (and mask) decoded, checked, and resized to the size the
    model generates at, `size_for(displayed width, displayed height).generated`; and that plan (the
    asked size: vqdm.server.sizes). `mask_rule` turns the mask into 255 = repaint (OpenAI's rule by
    default), `mask_blur` pixels of Gaussian blur soften its edge (A1111's), errors name the fields
    `names`, and `prepare` (A1111's inpainting options) has the last word on the EditInput.
    Blocking: run it in a worker thread."""
    try:
        # the full-size pixels die with _decode's frame
        edit, plan = _decode(image, mask, size_for, strength, max_pixels, mask_rule, names)
        if mask_blur and edit.mask is not None:
            edit.mask = edit.mask.filter(ImageFilter.GaussianBlur(mask_blur))
        return (edit if prepare is None else prepare(edit)), plan
    finally:
        _return_freed_memory()


def _return_freed_memory() -> None:
    # glibc keeps freed blocks in this thread's malloc arena, where a 4096² decode leaves ~60 MB of
    # resident memory behind; malloc_trim hands it back to the OS. Absent elsewhere (musl, macOS).
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _libc_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def _decode(image: BinaryIO, mask: BinaryIO | None, size_for: Callable[[int, int], SizePlan],
            strength: float, max_pixels: int, mask_rule: Callable[[Image.Image], Image.Image],
            names: tuple[str, str]) -> tuple[EditInput, SizePlan]:
    Image.MAX_IMAGE_PIXELS = max_pixels  # one value per server; refusals above it are ours (open_upload)
    image_name, mask_name = names
    src = open_upload(image, image_name, max_pixels)
    keep = None if mask is None else open_upload(mask, mask_name, max_pixels)
    if keep is not None and keep.size != src.size:
        raise bad_request(f"{mask_name} is {keep.size[0]}x{keep.size[1]} but {image_name} is {src.size[0]}x{src.size[1]} "
                          "(as displayed, after EXIF orientation); they must match", mask_name, "invalid_value")
    plan = size_for(*src.size)
    size = plan.generated
    rgb = _converted(lambda: src.convert("RGB").resize(size, Image.LANCZOS), image_name, src.mode)
    binary = None if keep is None else _converted(lambda: mask_rule(keep).resize(size, Image.NEAREST), mask_name,
                                                  keep.mode)
    return EditInput(image=rgb, mask=binary, strength=strength), plan


def auto_size(width: int, height: int, model_size: tuple[int, int], settings: Settings) -> tuple[int, int]:
    """`size` auto for an edit of a width x height upload: its own size rounded down to multiples of
    8 when the size limits allow it or it is the model's default size (which size auto always means
    for a generation); else the nearest size the limits allow, aspect kept as closely as multiples
    of 8 allow (an upload too thin for both min_side and max_side is stretched to fit)."""
    own = (max(8, width // 8 * 8), max(8, height // 8 * 8))
    if own == tuple(model_size) or size_problem(*own, settings) is None:
        return own
    lo, hi = -(-settings.min_side // 8) * 8, settings.max_side // 8 * 8
    grow = lo / min(width, height)
    shrink = min(hi / max(width, height), math.sqrt(settings.max_pixels / (width * height)))
    scale = min(max(grow, 1.0), shrink)

    def side(n: int) -> int:
        return min(hi, max(lo, round(n * scale / 8) * 8))

    w, h = side(width), side(height)
    while w * h > settings.max_pixels and max(w, h) > lo:  # rounding up may cross max_pixels
        w, h = (w - 8, h) if w >= h else (w, h - 8)
    return w, h
