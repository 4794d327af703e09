"""Swap a U-Net's selected layers for VQ modules, and the dense-weight views the quantizer needs."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

from vqdm.kernels import conv_weight_to_matrix
from vqdm.models.layer_selection import select_layers
from vqdm.models.vq_layers import VQ_MODULES, VQConv2d, VQLinear
from vqdm.vq_format import GROUP_SIZE


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """A Linear/Conv2d weight as [n, d]; convs in (k_h, k_w, C_in) column order (SPEC §2)."""
    if isinstance(module, nn.Conv2d):
        return conv_weight_to_matrix(module.weight)
    return module.weight


def make_vq_module(module: nn.Module, num_codebooks: int, group_size: int = GROUP_SIZE) -> nn.Module:
    """An empty VQ twin of a Linear/Conv2d (codes zero, bias copied)."""
    cls = VQConv2d if isinstance(module, nn.Conv2d) else VQLinear
    vq = cls.like(module, num_codebooks, group_size)
    if module.bias is not None and module.bias.device.type != "meta":
        with torch.no_grad():
            vq.bias.copy_(module.bias)
    return vq


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def replace_with_vq(unet: nn.Module, num_codebooks: int, group_size: int = GROUP_SIZE,
                    names: Iterable[str] | None = None) -> list[str]:
    """Replace the selected layers (or just `names`) by empty VQ modules in place; return the names."""
    chosen = dict(select_layers(unet))
    if names is not None:
        names = list(names)
        unknown = [n for n in names if n not in chosen]
        if unknown:
            raise ValueError(f"not quantizable layers of this U-Net: {unknown[:5]}")
        chosen = {n: chosen[n] for n in names}
    for name, module in chosen.items():
        set_submodule(unet, name, make_vq_module(module, num_codebooks, group_size))
    return list(chosen)


QuantizeFn = Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def quantize_layers(unet: nn.Module, num_codebooks: int, quantize_fn: QuantizeFn, group_size: int = GROUP_SIZE,
                    names: Iterable[str] | None = None) -> list[str]:
    """Quantize layers with `quantize_fn(name, W[n, d]) -> (codes, codebooks, scales)` and swap them in."""
    chosen = dict(select_layers(unet))
    names = list(chosen) if names is None else list(names)
    for name in names:
        dense = chosen[name]
        vq = make_vq_module(dense, num_codebooks, group_size)
        codes, codebooks, scales = quantize_fn(name, weight_matrix(dense).detach().float())
        vq.set_quantized(codes, codebooks, scales)
        set_submodule(unet, name, vq)
    return names


def vq_modules(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, VQ_MODULES)]


def set_backend(unet: nn.Module, backend: str) -> None:
    for _, m in vq_modules(unet):
        m.backend = backend
