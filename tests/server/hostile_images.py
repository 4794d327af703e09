"""Hostile uploads for POST /v1/images/edits: decompression bombs (PNG, GIF, TIFF, WebP), truncated
files, unusual modes, EXIF rotations and odd palettes. Deterministic (no randomness, no clock), so a
failing case can be replayed by name; importable by other tests and fuzzers:

    from tests.server.hostile_images import hostile_images
    for case in hostile_images(): ...

Each case says what a server with the default limits (`max_image_pixels` 4096²) must answer: a 400
naming the upload (`code`), or 200 with the picture as displayed (`displayed`, after EXIF rotation).
Bombs are mostly hand-made headers (a few dozen bytes claiming 20000×20000): the server must refuse
them from the header, before any pixel is decoded.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIDE = 64  # the accepted cases' size: a multiple of 8 within every default size limit
BOMB_SIDE = 20000  # 400 M pixels claimed: over 2x PIL's own default limit, and far over the server's


@dataclass(frozen=True)
class HostileImage:
    name: str
    data: bytes
    code: str | None  # the error code a default server answers (400); None: it is accepted (200)
    displayed: tuple[int, int] | None = None  # accepted: (width, height) once EXIF orientation is applied
    as_mask: bool = True  # meaningful as a mask too (a mask must match the image's displayed size)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(width: int, height: int, *, depth: int = 8, color: int = 2, rows: bytes = b"",
            extra: bytes = b"") -> bytes:
    """A PNG written chunk by chunk, so its header may claim anything (color 2 = RGB, 3 = palette)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", zlib.compress(rows))
            + _chunk(b"IEND", b""))


def gif_raw(width: int, height: int) -> bytes:
    """A GIF89a whose screen and single frame claim width x height, with one byte of LZW data."""
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b"\x3b"


def tiff_raw(width: int, height: int) -> bytes:
    """A little-endian baseline TIFF IFD claiming width x height 8-bit grey, with no strip data."""
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 1)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *t) for t in tags) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def webp_raw(width: int, height: int) -> bytes:
    """A lossless WebP (VP8L) whose header claims width x height (at most 16384 each) and no data."""
    bits = (width - 1) | ((height - 1) << 14)
    payload = b"\x2f" + struct.pack("<I", bits) + bytes(8)
    chunk = b"VP8L" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def picture(width: int = SIDE, height: int = SIDE) -> np.ndarray:
    """A smooth RGB picture with an off-centre disc, so a rotation or a flip is visible."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), np.full_like(x, 90)], -1)
    img[(x - width // 4) ** 2 + (y - height // 5) ** 2 < (min(width, height) // 6) ** 2] = (230, 40, 40)
    return img.astype(np.uint8)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def with_orientation(image: Image.Image, orientation: int, fmt: str) -> bytes:
    """`image` stored so that a viewer applying EXIF `orientation` (2-8) shows it unchanged."""
    # Image.transpose ops that undo each orientation (the inverse of what exif_transpose applies).
    undo = {2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180],
            4: [Image.Transpose.FLIP_TOP_BOTTOM], 5: [Image.Transpose.TRANSPOSE],
            6: [Image.Transpose.ROTATE_90], 7: [Image.Transpose.TRANSVERSE], 8: [Image.Transpose.ROTATE_270]}
    stored = image
    for op in undo[orientation]:
        stored = stored.transpose(op)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


def _modes() -> list[HostileImage]:
    rgb = Image.fromarray(picture())
    grey = rgb.convert("L")
    sixteen = Image.fromarray(np.asarray(grey, np.uint16) * 257)  # uint16 arrays are I;16
    palette_alpha = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_alpha.info["transparency"] = 0
    rgb48 = b"".join(b"\x00" + picture()[i].astype(">u2").tobytes() * 1 for i in range(SIDE))
    la = Image.merge("LA", (grey, grey.point(lambda v: 255 if v > 100 else 0)))
    return [
        HostileImage("jpeg-cmyk", encode(rgb.convert("CMYK"), "JPEG"), None, (SIDE, SIDE)),
        HostileImage("png-i16", encode(sixteen), None, (SIDE, SIDE)),
        HostileImage("png-rgb48", png_raw(SIDE, SIDE, depth=16, rows=rgb48), None, (SIDE, SIDE)),
        HostileImage("tiff-float", encode(Image.fromarray(np.asarray(grey, np.float32) / 255), "TIFF"),
                     "unsupported_image_format"),
        HostileImage("png-la", encode(la), None, (SIDE, SIDE)),
        HostileImage("png-palette-transparency", encode(palette_alpha, transparency=0), None, (SIDE, SIDE)),
        HostileImage("png-1bit", encode(grey.convert("1")), None, (SIDE, SIDE)),
        HostileImage("png-rgba-all-transparent", encode(Image.new("RGBA", (SIDE, SIDE))), None, (SIDE, SIDE)),
        HostileImage("webp-rgba", encode(rgb.convert("RGBA"), "WEBP", lossless=True), None, (SIDE, SIDE)),
        HostileImage("png-1x1", encode(Image.new("RGB", (1, 1), (1, 2, 3))), None, (1, 1), as_mask=False),
    ]


def _palettes() -> list[HostileImage]:
    rows = b"".join(b"\x00" + bytes((i * 7 + j) % 256 for j in range(SIDE)) for i in range(SIDE))
    huge = bytes(range(256)) * 3 * 400  # 102400 entries where PNG allows 256
    return [
        HostileImage("png-palette-huge", png_raw(SIDE, SIDE, color=3, rows=rows, extra=_chunk(b"PLTE", huge)),
                     "invalid_image"),
        # Two entries, indices up to 255: most pixels point past the end of the palette.
        HostileImage("png-palette-short", png_raw(SIDE, SIDE, color=3, rows=rows, extra=_chunk(b"PLTE", bytes(6))),
                     None, (SIDE, SIDE)),
        HostileImage("png-palette-ragged", png_raw(SIDE, SIDE, color=3, rows=rows, extra=_chunk(b"PLTE", bytes(7))),
                     None, (SIDE, SIDE)),
        HostileImage("png-palette-missing", png_raw(SIDE, SIDE, color=3, rows=rows), None, (SIDE, SIDE)),
    ]


def _bombs() -> list[HostileImage]:
    # A real, decodable 5000x5000 1-bit PNG (3 KB): between 1x and 2x of the default 4096² limit,
    # where PIL only warns, so the server's own check must refuse it.
    real = encode(Image.new("1", (5000, 5000)), optimize=True)
    return [
        HostileImage("png-bomb-header", png_raw(BOMB_SIDE, BOMB_SIDE), "image_too_large"),
        HostileImage("png-bomb-palette-1bit", png_raw(BOMB_SIDE, BOMB_SIDE, depth=1, color=3,
                                                      extra=_chunk(b"PLTE", bytes(6))), "image_too_large"),
        HostileImage("png-bomb-real-5000", real, "image_too_large"),
        HostileImage("png-bomb-wide", png_raw(2**31 - 1, 1), "image_too_large"),
        HostileImage("gif-bomb", gif_raw(BOMB_SIDE, BOMB_SIDE), "image_too_large"),
        HostileImage("tiff-bomb", tiff_raw(BOMB_SIDE, BOMB_SIDE), "image_too_large"),
        HostileImage("webp-bomb", webp_raw(16384, 16384), "image_too_large"),
        HostileImage("webp-header-only-small", webp_raw(SIDE, SIDE), "invalid_image"),
        HostileImage("png-zero-size", png_raw(0, 0), "invalid_image"),
    ]


def _truncated() -> list[HostileImage]:
    rgb = Image.fromarray(picture())
    out = []
    for fmt, options in (("PNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {"quality": 90})):
        data = encode(rgb, fmt, **options)
        out.append(HostileImage(f"{fmt.lower()}-truncated-half", data[: len(data) // 2], "invalid_image"))
        out.append(HostileImage(f"{fmt.lower()}-truncated-header", data[:16], "invalid_image"))
    return out


def _rotations() -> list[HostileImage]:
    # Not square, so a rotation changes the displayed size; the server must edit what a viewer shows.
    # Every orientation in JPEG (what phones write); one in PNG (lossless: the result is exact).
    shown = Image.fromarray(picture(SIDE + 32, SIDE))
    return [HostileImage(f"{fmt.lower()}-exif-orientation-{o}", with_orientation(shown, o, fmt), None,
                         (SIDE + 32, SIDE))
            for fmt, orientations in (("JPEG", range(2, 9)), ("PNG", (6,))) for o in orientations]


def hostile_images() -> list[HostileImage]:
    """Every case, in a fixed order with unique names."""
    cases = [*_bombs(), *_truncated(), *_modes(), *_palettes(), *_rotations()]
    assert len({c.name for c in cases}) == len(cases)
    return cases

