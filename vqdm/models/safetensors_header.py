"""The safetensors container, read and written by its header alone (no tensor is materialised).

    8 bytes     N, the header's length (unsigned, little-endian)
    N bytes     a JSON object starting with '{' (trailing spaces allowed): name -> {"dtype", "shape",
                "data_offsets": [begin, end]} relative to the data, and an optional "__metadata__"
                mapping names to strings
    the rest    the data: every byte belongs to exactly one tensor, in offset order

The reader holds a file to that whole format (https://github.com/huggingface/safetensors, "Format"):
the data "needs to be entirely indexed, and cannot contain holes", so bytes between or after the
tensors are refused, as the safetensors library itself refuses them ("incomplete metadata, file not
fully covered"); a checkpoint any tool can load has none. Padding lives inside the header (spaces).

Errors are `SafetensorsFormatError(path, reason)`; each caller turns them into its own error type
(ArtifactError, ModelFolderError) at its edge, keeping the path and the reason.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

MAX_HEADER = 100_000_000  # safetensors' own limit
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "U8": 1, "I8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


class SafetensorsFormatError(ValueError):
    """A file that is not a well-formed safetensors file; `reason` says what is wrong."""

    def __init__(self, path: object, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorEntry]  # in the header's order
    metadata: dict[str, str]
    size: int  # the file's length

    def shape(self, key: str) -> tuple[int, ...] | None:
        entry = self.tensors.get(key)
        return None if entry is None else entry.shape

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.tensors if k.startswith(prefix)]


def nbytes(dtype: str, shape: Iterable[int]) -> int:
    return DTYPE_BYTES[dtype] * math.prod(shape)


def is_pickle_name(path: str | Path) -> bool:
    """A .ckpt/.pt/.bin... name: read as a pickle and refused, so never one to write safetensors under."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def is_pickle_file(path: str | Path) -> bool:
    """A .ckpt/.pt/.bin name, or a zip (torch.save) or pickle (protocol 2+) signature."""
    path = Path(path)
    if is_pickle_name(path):
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and head[1] in range(2, 6))


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"name {key!r} appears twice")
        seen[key] = value
    return seen


def _entry(name: str, e: object, data_start: int) -> TensorEntry:
    bad = f"corrupt safetensors header: tensor {name!r} has a malformed entry {e!r}"
    if not isinstance(e, dict) or not isinstance(e.get("shape"), list) or not isinstance(e.get("data_offsets"), list):
        raise ValueError(bad)
    dtype, shape, offsets = e.get("dtype"), tuple(e["shape"]), e["data_offsets"]
    if len(offsets) != 2 or not all(type(x) is int and x >= 0 for x in (*shape, *offsets)):  # bool is no size
        raise ValueError(bad)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"corrupt safetensors header: tensor {name!r} has dtype {dtype!r}, not one of "
                         f"{', '.join(DTYPE_BYTES)}")
    a, b = offsets
    if b - a != nbytes(dtype, shape):
        raise ValueError(f"corrupt safetensors header: tensor {name!r}: dtype {dtype} shape {list(shape)} "
                         f"does not fit its {b - a:,} bytes")
    return TensorEntry(dtype, shape, data_start + a, data_start + b)


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """The header of a .safetensors file, checked against the format and the file's length; no
    tensor is read. Pickles (by name or signature) are refused before anything is parsed."""
    path = Path(path)
    if not path.is_file():
        raise SafetensorsFormatError(path, "no such file")
    if is_pickle_file(path):
        raise SafetensorsFormatError(path, "not a safetensors file but a pickle checkpoint (.ckpt/.pt), which vqdm "
                                           "never loads (unpickling can run code); convert it to .safetensors with "
                                           "a tool you trust")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsFormatError(path, f"truncated or not a safetensors file ({size:,} bytes)")
        n = int.from_bytes(head, "little")
        if n < 2 or n > min(size - 8, MAX_HEADER):
            raise SafetensorsFormatError(path, f"not a safetensors file, or truncated (header of {n:,} bytes "
                                               f"declared, file is {size:,} bytes)")
        raw = f.read(n)
    if not raw.startswith(b"{"):
        raise SafetensorsFormatError(path, "not a safetensors file (its header does not start with '{')")
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError and duplicate names are ValueErrors
        raise SafetensorsFormatError(path, f"corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(path, "corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsFormatError(path, "corrupt safetensors header (__metadata__ must map names to strings)")
    try:
        tensors = {name: _entry(name, e, 8 + n) for name, e in header.items()}
    except ValueError as e:
        raise SafetensorsFormatError(path, str(e)) from None
    end = max((e.end for e in tensors.values()), default=8 + n)
    if end > size:
        raise SafetensorsFormatError(path, f"truncated: its header declares {end:,} bytes, the file has {size:,} "
                                           "(an interrupted download or copy?)")
    at = 8 + n
    for name, e in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if e.start != at:  # the data is indexed end to end: no hole, no overlap
            raise SafetensorsFormatError(path, f"corrupt safetensors header: tensor {name!r} starts at byte "
                                               f"{e.start:,}, the tensor before it ends at {at:,}")
        at = e.end
    if end < size:
        raise SafetensorsFormatError(path, f"{size - end:,} bytes after the last tensor, which the safetensors "
                                           "format does not allow: altered, or not a safetensors file")
    return SafetensorsHeader(path, tensors, metadata, size)


def encode_header(tensors: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and the header of a file holding `tensors` ((name, dtype, shape)) in that
    order, back to back; the header is padded with spaces so the data starts 8-byte aligned."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in tensors:
        size = nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw
