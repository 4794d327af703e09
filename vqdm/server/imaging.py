"""Encode generated images for the response (Pillow does the work)."""
from __future__ import annotations

import base64
import io

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
DEFAULT_QUALITY = 90


def encode_image(image, output_format: str = "png", compression: int | None = None) -> bytes:
    """PNG is lossless (compression picks zlib effort); jpeg/webp take compression as quality 0-100."""
    buf = io.BytesIO()
    fmt = FORMATS[output_format]
    if fmt == "PNG":
        level = 6 if compression is None else round(compression * 9 / 100)
        image.save(buf, format=fmt, compress_level=level)
    else:
        image.convert("RGB").save(buf, format=fmt, quality=DEFAULT_QUALITY if compression is None else compression)
    return buf.getvalue()


def encode_b64(images: list, output_format: str = "png", compression: int | None = None) -> list[str]:
    return [base64.b64encode(encode_image(im, output_format, compression)).decode("ascii") for im in images]
