"""The VQ weight format (SPEC §2): what K, B and g may be, the tensors' shapes and empty
constructors, what a layer costs, and the one decode.

For a weight W [n, d] cut into groups of g consecutive inputs:
    Ŵ[i, g·j : g·(j+1)] = s_i · Σ_m C_m[b[i, j, m]]
    codes     [n, d/g, K]  uint8   (B = NBITS: codeword index per group and codebook)
    codebooks [K, 2^B, g]  float   (stored fp16)
    scales    [n]          float   (stored fp16, one per output channel)

It sits at the top of the package so that kernels, models and the quantizer all read it without
kernels importing the quantizer. `decode` is the plain-torch reference every fast path is tested
against (`vqdm.kernels.dequantize` is this function).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vqdm.errors import ConfigError

NBITS = 8  # B: bits per code; codes are stored as uint8
GROUP_SIZE = 8  # g: consecutive inputs per group, what the kernels are built for
CODE_DTYPE = torch.uint8  # codes at rest and in memory
SUPPORTED_CODEBOOKS = (2, 3, 4)  # K of the vqdm-2bit / -3bit / -4bit artifacts
SUPPORTED_NBITS = (NBITS,)
SUPPORTED_GROUP_SIZES = (GROUP_SIZE,)
STORED_FLOAT_BITS = 16  # codebooks and scales are stored as fp16
DENSE_BITS = STORED_FLOAT_BITS  # parameters an artifact leaves dense are stored as fp16 too


@dataclass(frozen=True)
class VQFormat:
    """K codebooks of 2^B codewords of g values each."""

    num_codebooks: int
    nbits: int = NBITS
    group_size: int = GROUP_SIZE

    @property
    def codebook_size(self) -> int:
        return 2**self.nbits

    def check_artifact(self) -> None:
        """Raise ConfigError unless this is one of the formats artifacts and kernels support."""
        if self.num_codebooks not in SUPPORTED_CODEBOOKS:
            raise ConfigError(f"--bits {self.num_codebooks} is not supported: choose 2, 3 or 4 "
                              f"(codebooks of {NBITS}-bit codes, groups of {GROUP_SIZE})")
        if self.nbits not in SUPPORTED_NBITS:
            raise ConfigError(f"codebook bits B={self.nbits} is not supported: codes are uint8, B must be {NBITS}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ConfigError(f"group size g={self.group_size} is not supported: the kernels and format use "
                              f"g={GROUP_SIZE}")

    def bits_per_weight(self, n: int, d: int) -> float:
        """K·B/g + K·2^B·g·16/(n·d) + 16/d: codes, fp16 codebooks, fp16 per-output scales."""
        k, b, g = self.num_codebooks, self.nbits, self.group_size
        return k * b / g + k * (2**b) * g * STORED_FLOAT_BITS / (n * d) + STORED_FLOAT_BITS / d

    def layer_bytes(self, n: int, d: int) -> int:
        """Bytes at rest: uint8 codes [n, d/g, K], fp16 codebooks [K, 2^B, g], fp16 scales [n]."""
        if self.nbits not in SUPPORTED_NBITS:
            raise ValueError(f"codes are stored as uint8: only nbits={NBITS} is supported")
        k, g = self.num_codebooks, self.group_size
        return n * (d // g) * k + k * self.codebook_size * g * 2 + 2 * n

    def shapes(self, n: int, d: int) -> dict[str, tuple[int, ...]]:
        """The stored tensors of an [n, d] weight: codes [n, d/g, K], codebooks [K, 2^B, g], scales [n]."""
        k, g = self.num_codebooks, self.group_size
        return {"codes": (n, d // g, k), "codebooks": (k, self.codebook_size, g), "scales": (n,)}

    def empty(self, n: int, d: int, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, codebooks, scales) of an [n, d] weight: zero codes and codewords, unit scales.

        Codes are uint8; codebooks and scales are in `dtype`.
        """
        if d % self.group_size:
            raise ValueError(f"group size {self.group_size} must divide the input dimension {d}")
        shapes = self.shapes(n, d)
        codes = torch.zeros(shapes["codes"], dtype=CODE_DTYPE, device=device)  # [n, d/g, K]
        codebooks = torch.zeros(shapes["codebooks"], dtype=dtype, device=device)  # [K, 2^B, g]
        scales = torch.ones(shapes["scales"], dtype=dtype, device=device)  # [n]
        return codes, codebooks, scales

    def check_shapes(self, n: int, d: int, codes: torch.Tensor, codebooks: torch.Tensor,
                     scales: torch.Tensor) -> None:
        """Raise ValueError unless the three tensors have this format's shapes for an [n, d] weight."""
        want = self.shapes(n, d)
        for name, t in (("codes", codes), ("codebooks", codebooks), ("scales", scales)):
            if tuple(t.shape) != want[name]:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, this layer needs {want[name]}")


def check_format(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor | None) -> None:
    """Raise ValueError with a readable message when the tensors do not fit together."""
    if codes.dim() != 3:
        raise ValueError(f"codes must be [n, d/g, K], got shape {tuple(codes.shape)}")
    if codes.dtype != CODE_DTYPE:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if codebooks.dim() != 3:
        raise ValueError(f"codebooks must be [K, 2^B, g], got shape {tuple(codebooks.shape)}")
    n, _, k = codes.shape
    if codebooks.shape[0] != k:
        raise ValueError(
            f"codes have {k} codebooks but codebooks tensor holds {codebooks.shape[0]}"
        )
    if codebooks.shape[1] > 2**NBITS:
        raise ValueError(f"uint8 codes address at most {2**NBITS} codewords, codebooks have {codebooks.shape[1]}")
    if scales is not None and scales.shape != (n,):
        raise ValueError(f"scales must be [n]={n}, got shape {tuple(scales.shape)}")


def decode_groups(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Σ_m C_m[codes[..., m]]: codes [..., K] (any integer dtype) -> [..., g], no scales.

    The unscaled sum the AQ search works on; `decode` is it times the scales. Differentiable in
    the codebooks.
    """
    idx = codes.long()
    u = codebooks[0][idx[..., 0]]
    for m in range(1, codebooks.shape[0]):
        u = u + codebooks[m][idx[..., m]]
    return u


def decode(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dense weight [n, d] in the codebooks' dtype; differentiable in codebooks and scales."""
    check_format(codes, codebooks, scales)
    n, groups, _ = codes.shape
    w = decode_groups(codes, codebooks)  # [n, d/g, g]
    return w.reshape(n, groups * codebooks.shape[2]) * scales.to(w.dtype)[:, None]
