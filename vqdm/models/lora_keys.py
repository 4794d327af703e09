"""What a LoRA file says: its tensors, which dialect its keys are in, and the layer each pair targets.

This module reads the file and normalises its keys; `vqdm.models.lora` matches the result to a
pipeline's layers and applies it. Nothing here knows about VQ layers.

Files read (safetensors only; pickled .bin/.pt/.ckpt files are refused, they can run code):
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `lora_B.weight` (also without the `unet.`
  prefix, with PEFT's `base_model.model.` prefix, and the older `.lora.down/.up`,
  `.lora_linear_layer.down/.up` and `attn.processor.to_q_lora.down` spellings), alphas from the
  file's `lora_adapter_metadata` (diffusers >= 0.34) or `<module>.alpha` keys, else alpha = rank;
  `text_encoder.` / `text_encoder_2.` keys go to the two (dense) text encoders.
- kohya-ss: `lora_unet_<module_with_underscores>.lora_down.weight` / `lora_up.weight` / `alpha`,
  `lora_te1_…` / `lora_te2_…` (`lora_te_…` = te1); module names in diffusers spelling or in the
  sgm spelling kohya uses for SDXL (`input_blocks_4_1_…`), which diffusers' own mapping renames.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from vqdm.errors import VQDMError
from vqdm.models.safetensors_header import SafetensorsFormatError, is_pickle_file, read_safetensors_header

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
# (regex on a diffusers/PEFT key) -> which half it is; group 1 is the module path.
_DIFFUSERS_PATTERNS = [
    (re.compile(r"^(.+)\.lora_A(?:\.[A-Za-z0-9_-]+)?\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_B(?:\.[A-Za-z0-9_-]+)?\.weight$"), "up"),
    (re.compile(r"^(.+)\.lora(?:_linear_layer)?\.down\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora(?:_linear_layer)?\.up\.weight$"), "up"),
    (re.compile(r"^(.+)\.alpha$"), "alpha"),
]
# Old attention-processor spelling: `attn1.processor.to_q_lora.down.weight` is layer `attn1.to_q`.
_PROCESSOR_RE = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
# Inner layer names of kohya's sgm SDXL U-Net -> diffusers (block indices are mapped by diffusers).
_SGM_INNER = [("in_layers_2", "conv1"), ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"),
              ("skip_connection", "conv_shortcut"), ("downsamplers_0_op", "downsamplers_0_conv")]
_SGM_BLOCKS = [("input_blocks_", "down_blocks_"), ("middle_block_", "mid_block_"), ("output_blocks_", "up_blocks_")]
_SGM_TOP = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
            "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
            "label_emb_0_2": "add_embedding_linear_2"}


class LoraError(VQDMError, ValueError):
    """A LoRA file that cannot be read, or that does not fit the model it is loaded onto."""


@dataclass
class LoraKeys:
    """A LoRA state dict grouped by target layer, in either dialect.

    `groups[(component, module)]` holds `down`, `up` (tensors), optionally `alpha` (a tensor) and
    `key` (the file's name for the layer, for error messages). For kohya files `module` has
    underscores in place of dots (kohya flattens the path; the caller matches it against an
    underscored layer map). `configs` are the PEFT LoraConfig fields per component from the file's
    metadata (diffusers files only)."""

    groups: dict[tuple[str, str], dict]
    kohya: bool
    configs: dict[str, dict]


# -- reading files ----------------------------------------------------------------------------------
def _check_lora_file(path: Path) -> None:
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    if is_pickle_file(path):
        raise LoraError(f"{path}: looks like a pickled PyTorch file; vqdm loads LoRAs only from .safetensors "
                        "(pickles can run code when loaded). Convert it with safetensors.torch.save_file.")


def _unreadable(path: Path, e: object) -> LoraError:
    return LoraError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {e}")


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors LoRA file, with errors that say what is wrong."""
    path = Path(path)
    _check_lora_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(path, e) from None
    if not tensors:
        raise LoraError(f"{path}: the file holds no tensors")
    return tensors, metadata


def lora_file_weights(path: str | Path) -> int:
    """How many weights the file's down / up matrices hold (alphas left out), from its header
    alone: what a budget can be checked against before the tensors are read."""
    path = Path(path)
    _check_lora_file(path)
    try:
        header = read_safetensors_header(path)
    except SafetensorsFormatError as e:
        raise _unreadable(path, e.reason) from None
    return sum(math.prod(e.shape) for e in header.tensors.values() if len(e.shape) >= 2)


# -- the two dialects ---------------------------------------------------------------------------------
def group_lora_keys(tensors: dict[str, torch.Tensor], metadata: dict[str, str], unet_config=None) -> LoraKeys:
    """Group a LoRA state dict by target layer; `unet_config` lets kohya's sgm block names be mapped."""
    if _is_kohya(tensors):
        return LoraKeys(_group_kohya(tensors, unet_config), kohya=True, configs={})
    return LoraKeys(_group_diffusers(tensors), kohya=False, configs=_metadata_configs(metadata))


def _metadata_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata`: per component the PEFT LoraConfig fields we need."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out: dict[str, dict] = {}
    for comp in COMPONENTS:
        cfg = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith(comp + ".")}
        if cfg:
            out[comp] = cfg
    return out


def _split_diffusers_key(key: str) -> tuple[str, str]:
    """'unet.a.b' -> ('unet', 'a.b'); a key without a component prefix is the U-Net's (plain PEFT)."""
    key = key.removeprefix("base_model.model.")
    for comp in ("text_encoder_2", "text_encoder", "unet"):
        if key.startswith(comp + "."):
            return comp, key[len(comp) + 1:]
    return "unet", key


def _is_kohya(tensors: dict[str, torch.Tensor]) -> bool:
    return all(k.startswith(tuple(_KOHYA_PREFIXES)) for k in tensors)


def _unsupported(key: str) -> str | None:
    if "dora_scale" in key or "lora_magnitude_vector" in key:
        return "DoRA adapters are not supported (only plain LoRA)"
    if any(s in key for s in ("hada_", "lokr_", "lora_mid", ".diff", "oft_")):
        return "LyCORIS LoHa / LoKr / LoCon-Tucker / OFT adapters are not supported (only plain LoRA)"
    if key.endswith(".bias"):
        return "LoRA bias terms are not supported"
    return None


def _group_kohya(tensors, unet_config) -> dict[tuple[str, str], dict]:
    """{(component, flat_name): {down, up, alpha, key}} with underscores still in the names."""
    # Deferred: diffusers' loaders package takes seconds to import, and only kohya files need it.
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    tensors = dict(tensors)
    if unet_config is not None and any(s in k for k in tensors for s in ("input_blocks", "middle_block",
                                                                         "output_blocks")):
        top = {k: v for k, v in tensors.items() if any(k.startswith(f"lora_unet_{p}.") for p in _SGM_TOP)}
        rest = {k: v for k, v in tensors.items() if k not in top}
        tensors = {**_maybe_map_sgm_blocks_to_diffusers(rest, unet_config), **top}
    groups: dict[tuple[str, str], dict] = {}
    for key, t in tensors.items():
        why = _unsupported(key)
        if why:
            raise LoraError(f"LoRA key {key!r}: {why}")
        name, _, suffix = key.partition(".")
        prefix = next(p for p in sorted(_KOHYA_PREFIXES, key=len, reverse=True) if name.startswith(p))
        comp, flat = _KOHYA_PREFIXES[prefix], name[len(prefix):]
        if comp == "unet":
            flat = _SGM_TOP.get(flat, flat)
            for old, new in _SGM_BLOCKS:  # diffusers renumbered the blocks but kept the sgm words
                if flat.startswith(old):
                    flat = new + flat[len(old):]
            for old, new in _SGM_INNER:
                flat = flat.replace(old, new)
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(suffix)
        if part is None:
            raise LoraError(f"LoRA key {key!r}: unknown kohya-ss entry {suffix!r} (expected lora_down.weight, "
                            "lora_up.weight or alpha)")
        groups.setdefault((comp, flat), {"key": name})[part] = t
    return groups


def _group_diffusers(tensors) -> dict[tuple[str, str], dict]:
    groups: dict[tuple[str, str], dict] = {}
    for key, t in tensors.items():
        why = _unsupported(key)
        if why:
            raise LoraError(f"LoRA key {key!r}: {why}")
        for pattern, part in _DIFFUSERS_PATTERNS:
            m = pattern.match(key)
            if m:
                break
        else:
            raise LoraError(f"LoRA key {key!r} is neither a diffusers/PEFT (lora_A/lora_B) nor a kohya-ss "
                            "(lora_unet_…lora_down/lora_up) entry")
        comp, module = _split_diffusers_key(m.group(1))
        pm = _PROCESSOR_RE.search(module)
        if pm:
            layer = "to_out.0" if pm.group(1) == "to_out" else pm.group(1)
            module = module[:pm.start()] + "." + layer
        groups.setdefault((comp, module), {"key": m.group(1)})[part] = t
    return groups


# -- the file's own weighting -------------------------------------------------------------------------
def lora_scale(group: dict, comp: str, module: str, configs: dict[str, dict], rank: int) -> float:
    """alpha / rank (alpha / sqrt(rank) for rsLoRA): from the group's alpha key, else the metadata's
    `alpha_pattern` / `lora_alpha`, else alpha = rank."""
    cfg = configs.get(comp, {})
    alpha = group.get("alpha")
    if alpha is not None:
        alpha = float(alpha.float().reshape(-1)[0])
    else:
        pattern = cfg.get("alpha_pattern") or {}
        hit = [v for k, v in pattern.items() if module == k or module.endswith("." + k)]
        alpha = float(hit[0]) if hit else float(cfg.get("lora_alpha", rank))
    return alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
