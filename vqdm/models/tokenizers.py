"""Offline CLIP tokenizers for pipelines built from configs.

No hub access here, so the CLIP BPE vocabulary comes from the open_clip wheel
(`bpe_simple_vocab_16e6.txt.gz`, installed with --no-deps) and is turned into the
vocab.json + merges.txt that transformers' CLIPTokenizer reads.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from functools import lru_cache
from pathlib import Path

from vqdm.errors import VQDMError

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's reversible byte -> printable-character table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise VQDMError(
            "the CLIP vocabulary ships in the open_clip wheel, which is not installed: "
            "run `pip install --no-deps open-clip-torch` (--no-deps keeps your torch build)"
        )
    path = Path(spec.origin).parent / _BPE_FILE
    if not path.is_file():
        raise VQDMError(f"{path} is missing from the installed open_clip package; reinstall open-clip-torch")
    return path


@lru_cache(maxsize=4)
def clip_vocab_files(num_merges: int = _NUM_MERGES) -> tuple[str, str]:
    """Write vocab.json and merges.txt once per process; return their paths.

    `num_merges` < CLIP's 48,894 keeps the first merges only (the most frequent pairs): a smaller
    token table that still encodes any text, since the 512 byte tokens stay.
    """
    if not 0 <= num_merges <= _NUM_MERGES:
        raise ValueError(f"num_merges must be in [0, {_NUM_MERGES}], got {num_merges}")
    lines = gzip.open(_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : num_merges + 1]]
    base = list(_bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(tempfile.mkdtemp(prefix="vqdm-clip-vocab-"))
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return str(out / "vocab.json"), str(out / "merges.txt")


def build_clip_tokenizer(pad_token: str = "<|endoftext|>", num_merges: int | None = None):
    """A CLIPTokenizer identical in vocabulary to SDXL's (77 tokens max); `num_merges`: a cut-down BPE."""
    from transformers import CLIPTokenizer  # deferred: seconds to import; the CLI parser loads vqdm.models

    vocab, merges = clip_vocab_files(_NUM_MERGES if num_merges is None else num_merges)
    return CLIPTokenizer(vocab, merges, pad_token=pad_token, model_max_length=77)
