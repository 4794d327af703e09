"""Bits-per-weight and byte accounting for VQ U-Nets (SPEC §2 formula)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch.nn as nn

from vqdm.models.layer_selection import SUBSETS, layer_dims, layers_in_subsets, select_layers
from vqdm.models.vq_layers import VQ_MODULES
from vqdm.vq_format import DENSE_BITS, GROUP_SIZE, NBITS, VQFormat


def layer_bits(n: int, d: int, num_codebooks: int, nbits: int = NBITS, group_size: int = GROUP_SIZE) -> float:
    """Bits per weight of one VQ layer: codes + fp16 codebooks + fp16 per-output scales.

    The one function form of `VQFormat.bits_per_weight` (SPEC §2), for callers holding K, B, g apart.
    """
    return VQFormat(num_codebooks, nbits, group_size).bits_per_weight(n, d)


def layer_bytes(n: int, d: int, num_codebooks: int, nbits: int = NBITS, group_size: int = GROUP_SIZE) -> int:
    """Bytes at rest: uint8 codes [n, d/g, K], fp16 codebooks [K, 2^B, g], fp16 scales [n]."""
    return VQFormat(num_codebooks, nbits, group_size).layer_bytes(n, d)


@dataclass
class Plan:
    """What quantizing a U-Net would give; keys match `vqdm plan --json` (SPEC §7)."""

    layers: int
    linear_layers: int
    conv_layers: int
    quantized_weights: int
    unet_params: int
    bits_per_weight_quantized: float
    bits_per_weight_unet: float
    unet_bytes: int
    dense_fp16_bytes: int
    dense_fp32_bytes: int
    num_codebooks: int
    nbits: int
    group_size: int
    subsets: list[str] = field(default_factory=lambda: list(SUBSETS))  # quantized; the others stay dense fp16

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compression_vs_fp16"] = self.dense_fp16_bytes / self.unet_bytes
        return d


def plan_unet(unet: nn.Module, num_codebooks: int, nbits: int = NBITS, group_size: int = GROUP_SIZE,
              subsets: Iterable[str] = SUBSETS) -> Plan:
    """Works on the meta device: only shapes are read. Layers outside `subsets` count as dense fp16."""
    subsets = [s for s in SUBSETS if s in set(subsets)]
    layers = layers_in_subsets(select_layers(unet), subsets)
    unet_params = sum(p.numel() for p in unet.parameters())
    q_weights = 0
    q_bits = 0.0
    q_bytes = 0
    n_linear = 0
    for _, m in layers:
        n, d = layer_dims(m)
        q_weights += n * d
        q_bits += layer_bits(n, d, num_codebooks, nbits, group_size) * n * d
        q_bytes += layer_bytes(n, d, num_codebooks, nbits, group_size)
        n_linear += isinstance(m, nn.Linear)
    rest = unet_params - q_weights
    return Plan(
        layers=len(layers), linear_layers=n_linear, conv_layers=len(layers) - n_linear,
        quantized_weights=q_weights, unet_params=unet_params,
        bits_per_weight_quantized=q_bits / max(q_weights, 1),
        bits_per_weight_unet=(q_bits + DENSE_BITS * rest) / unet_params,
        unet_bytes=q_bytes + 2 * rest, dense_fp16_bytes=2 * unet_params, dense_fp32_bytes=4 * unet_params,
        num_codebooks=num_codebooks, nbits=nbits, group_size=group_size, subsets=subsets,
    )


def resident_weight_bytes(unet: nn.Module) -> dict[str, int]:
    """Bytes of a loaded (possibly VQ) U-Net as stored in memory, and its dense fp16/fp32 equivalents."""
    stored = sum(t.numel() * t.element_size() for t in unet.parameters())
    stored += sum(t.numel() * t.element_size() for t in unet.buffers())
    dense_params = sum(p.numel() for p in unet.parameters())
    for m in unet.modules():
        if isinstance(m, VQ_MODULES):
            dense_params += m.n * m.d - m.codebooks.numel() - m.scales.numel()
    return {"stored": stored, "dense_fp16": 2 * dense_params, "dense_fp32": 4 * dense_params}
