"""The VQ weight format (SPEC §2): what K, B and g may be, what a layer costs, and the one decode.

For a weight W [n, d] cut into groups of g consecutive inputs:
    Ŵ[i, g·j : g·(j+1)] = s_i · Σ_m C_m[b[i, j, m]]
    codes     [n, d/g, K]  uint8   (B = 8: codeword index per group and codebook)
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

SUPPORTED_CODEBOOKS = (2, 3, 4)  # K of the vqdm-2bit / -3bit / -4bit artifacts
SUPPORTED_NBITS = (8,)  # codes are stored as uint8
SUPPORTED_GROUP_SIZES = (8,)  # what the kernels are built for
STORED_FLOAT_BITS = 16  # codebooks and scales are stored as fp16


@dataclass(frozen=True)
class VQFormat:
    """K codebooks of 2^B codewords of g values each."""

    num_codebooks: int
    nbits: int = 8
    group_size: int = 8

    @property
    def codebook_size(self) -> int:
        return 2**self.nbits

    def check_artifact(self) -> None:
        """Raise ConfigError unless this is one of the formats artifacts and kernels support."""
        if self.num_codebooks not in SUPPORTED_CODEBOOKS:
            raise ConfigError(f"--bits {self.num_codebooks} is not supported: choose 2, 3 or 4 "
                              "(codebooks of 8-bit codes, groups of 8)")
        if self.nbits not in SUPPORTED_NBITS:
            raise ConfigError(f"codebook bits B={self.nbits} is not supported: codes are uint8, B must be 8")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ConfigError(f"group size g={self.group_size} is not supported: the kernels and format use g=8")

    def bits_per_weight(self, n: int, d: int) -> float:
        """K·B/g + K·2^B·g·16/(n·d) + 16/d: codes, fp16 codebooks, fp16 per-output scales."""
        k, b, g = self.num_codebooks, self.nbits, self.group_size
        return k * b / g + k * (2**b) * g * STORED_FLOAT_BITS / (n * d) + STORED_FLOAT_BITS / d

    def layer_bytes(self, n: int, d: int) -> int:
        """Bytes at rest: uint8 codes [n, d/g, K], fp16 codebooks [K, 2^B, g], fp16 scales [n]."""
        if self.nbits not in SUPPORTED_NBITS:
            raise ValueError("codes are stored as uint8: only nbits=8 is supported")
        k, g = self.num_codebooks, self.group_size
        return n * (d // g) * k + k * self.codebook_size * g * 2 + 2 * n


def check_format(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor | None) -> None:
    """Raise ValueError with a readable message when the tensors do not fit together."""
    if codes.dim() != 3:
        raise ValueError(f"codes must be [n, d/g, K], got shape {tuple(codes.shape)}")
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if codebooks.dim() != 3:
        raise ValueError(f"codebooks must be [K, 2^B, g], got shape {tuple(codebooks.shape)}")
    n, _, k = codes.shape
    if codebooks.shape[0] != k:
        raise ValueError(
            f"codes have {k} codebooks but codebooks tensor holds {codebooks.shape[0]}"
        )
    if codebooks.shape[1] > 256:
        raise ValueError(f"uint8 codes address at most 256 codewords, codebooks have {codebooks.shape[1]}")
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
