"""Which U-Net modules get quantized (SPEC §2): one rule over the module tree, no name lists."""
from __future__ import annotations

from typing import Iterable

import torch.nn as nn

from vqdm.errors import ConfigError

QUANTIZED_PREFIXES = ("down_blocks.", "mid_block.", "up_blocks.")
MIN_FEATURES = 16
# Time-embedding projections inside resnets read the timestep embedding, not image features:
# they stay dense like the top-level time and add embeddings.
EXCLUDED_LEAF_NAMES = ("time_emb_proj",)

# Calibration order: the seven subsets of SPEC §3.3.
SUBSETS = ("down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2")


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(n, d) of the weight as a matrix: outputs x inputs (convs: C_out x k_h·k_w·C_in/groups)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.out_channels, kh * kw * module.in_channels // module.groups
    raise TypeError(f"not a quantizable layer: {type(module).__name__}")


def is_quantizable(name: str, module: nn.Module) -> bool:
    if not isinstance(module, (nn.Linear, nn.Conv2d)) or not name.startswith(QUANTIZED_PREFIXES):
        return False
    if name.rsplit(".", 1)[-1] in EXCLUDED_LEAF_NAMES:
        return False
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return False
    if isinstance(module, nn.Linear):
        return min(module.in_features, module.out_features) >= MIN_FEATURES
    return min(module.in_channels, module.out_channels) >= MIN_FEATURES


def select_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every quantizable (name, module) of a U-Net, in module-tree order."""
    return [(name, m) for name, m in unet.named_modules() if is_quantizable(name, m)]


def subset_of(name: str) -> str:
    """The calibration subset ("down_blocks.1", "mid_block", ...) a layer name belongs to."""
    for s in SUBSETS:
        if name == s or name.startswith(s + "."):
            return s
    raise ValueError(f"{name} is outside the quantized blocks")


def parse_subsets(subsets: str | Iterable[str] | None) -> tuple[str, ...]:
    """Subset names ("down_blocks.0,mid_block" or a list) in calibration order; None or empty text: all seven.

    An unknown name is refused with the valid ones listed; duplicates collapse.
    """
    if subsets is None:
        return SUBSETS
    names = [s.strip() for s in (subsets.split(",") if isinstance(subsets, str) else subsets)]
    names = [s for s in names if s]
    if not names:
        raise ConfigError(f"no subset given; choose from {', '.join(SUBSETS)}")
    unknown = [s for s in names if s not in SUBSETS]
    if unknown:
        raise ConfigError(f"unknown subset(s) {', '.join(unknown)}; the U-Net's subsets are {', '.join(SUBSETS)}")
    return tuple(s for s in SUBSETS if s in names)


def layers_in_subsets(layers: Iterable[tuple[str, nn.Module]], subsets: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of `layers` that belong to one of `subsets`, order kept."""
    wanted = set(subsets)
    return [(n, m) for n, m in layers if subset_of(n) in wanted]
