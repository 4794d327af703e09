"""Single-file SDXL checkpoints in the original (SGM) key layout, read and written offline.

    model.diffusion_model.*                  the U-Net
    conditioner.embedders.0.transformer.*    CLIP ViT-L text encoder (transformers' CLIPTextModel layout)
    conditioner.embedders.1.model.*          OpenCLIP ViT-bigG text encoder (open_clip layout: fused
                                             attn.in_proj, text_projection as x @ P)
    first_stage_model.*                      the VAE (optional: else `--vae FILE_OR_FOLDER`)
    model_ema.*                              EMA copies, ignored

One key map (`key_map`), built from a preset's diffusers components, serves both directions:
`load_single_file` reads such a file into a StableDiffusionXLPipeline, `write_single_file` writes a
pipeline as one. The architecture is the packaged preset whose every shape the file matches (or the
one `--config` names); configs, tokenizers and scheduler come from vqdm.models.configs, never a hub.
Weights cannot tell SDXL from SDXL-Turbo, so the family comes from `--family`, else the file's
metadata (`vqdm.family`, or "turbo" in modelspec.architecture / modelspec.title), else sdxl.

The header is parsed here before any tensor is read, so pickles, truncated files and the kinds
vqdm does not support (SD 1.x/2.x, the SDXL refiner, inpainting U-Nets) are refused with one line.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from vqdm.errors import ModelFolderError
from vqdm.models.artifact_file import MANIFEST_KEY
from vqdm.models.configs import PRESETS, Preset
from vqdm.models.safetensors_header import (SafetensorsFormatError, SafetensorsHeader, encode_header, is_pickle_name,
                                            read_safetensors_header)
from vqdm.single_file_flags import FAMILIES, add_single_file_flags  # noqa: F401 - the flags, re-exported

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
PREFIXES = {"unet": UNET_PREFIX, "text_encoder": CLIP_L_PREFIX, "text_encoder_2": CLIP_G_PREFIX, "vae": VAE_PREFIX}
# Tensors real SDXL files carry that no diffusers component has: skipped on read, not written.
IGNORED_KEYS = (CLIP_L_PREFIX + "text_model.embeddings.position_ids", CLIP_G_PREFIX + "logit_scale")
FAMILY_KEY = "vqdm.family"  # metadata key this writer sets and the reader trusts first
# Every dtype the header reader accepts (safetensors_header.DTYPE_BYTES), as torch reads it.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
           "U8": torch.uint8, "BOOL": torch.bool}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SingleFileOptions:
    """What a single file cannot say about itself (CLI: --family, --vae, --config)."""

    family: str | None = None  # "sdxl" / "sdxl-turbo"; None: from the file's metadata, else sdxl
    vae: str | None = None  # a VAE file or folder, for files without first_stage_model.*
    config: str | None = None  # a preset name (vqdm.models.configs); None: the preset the shapes match
    # the family when neither `family` nor the metadata say, and from where (quantize: its --preset)
    fallback_family: str | None = None
    fallback_source: str = ""

    def __post_init__(self) -> None:
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.config is not None and self.config not in PRESETS:
            raise ValueError(f"--config: unknown preset {self.config!r}; choose one of {', '.join(PRESETS)}")


def single_file_options(args, fallback_family: str | None = None, fallback_source: str = "") -> SingleFileOptions:
    """The options `add_single_file_flags` parsed (absent flags: None); `fallback_family`: see SingleFileOptions."""
    return SingleFileOptions(family=getattr(args, "family", None), vae=getattr(args, "vae", None),
                             config=getattr(args, "config", None), fallback_family=fallback_family,
                             fallback_source=fallback_source)


# --- the header (vqdm.models.safetensors_header), its errors as ModelFolderError ------------------

def read_header(path: str | Path) -> SafetensorsHeader:
    """The checked header of a .safetensors file; pickles are refused unread, nothing else is read."""
    try:
        return read_safetensors_header(path)
    except SafetensorsFormatError as e:
        raise ModelFolderError(str(e)) from None


def is_vqdm_artifact_file(header: SafetensorsHeader) -> bool:
    """A compressed vqdm artifact written as one file (its manifest in the header metadata)."""
    return MANIFEST_KEY in header.metadata



def refuse_unsupported(header: SafetensorsHeader) -> None:
    """One line naming what the file is, for every kind vqdm does not read; silent for an SDXL base file."""
    path, shape = header.path, header.shape
    conv_in = shape(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        if any(k.startswith(("down_blocks.", "mid_block.", "conv_in.")) for k in header.tensors):
            what = "a diffusers-layout U-Net (down_blocks.*), not a whole original-layout checkpoint: pass its diffusers folder"
        elif any("lora" in k for k in header.tensors):
            what = "a LoRA, not a model"
        elif header.keys(VAE_PREFIX) or header.shape("encoder.down.0.block.0.norm1.weight"):
            what = "a VAE only (use it with --vae)"
        else:
            what = f"no U-Net (model.diffusion_model.*) among its {len(header.tensors)} tensors"
        raise ModelFolderError(f"{path}: {what}; vqdm reads whole SDXL / SDXL-Turbo checkpoints")
    if len(conv_in) == 4 and conv_in[1] == 9:
        raise ModelFolderError(f"{path}: an inpainting U-Net (9 input channels); vqdm supports text-to-image "
                               "SDXL / SDXL-Turbo (4 input channels) only")
    if len(conv_in) == 4 and conv_in[1] != 4:
        raise ModelFolderError(f"{path}: a U-Net with {conv_in[1]} input channels; vqdm supports SDXL / SDXL-Turbo (4)")
    if header.keys("cond_stage_model.") or not header.keys(UNET_PREFIX + "label_emb."):
        to_k = shape(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
        width = to_k[1] if to_k else None
        kind = {768: "SD 1.x", 1024: "SD 2.x"}.get(width, "pre-SDXL Stable Diffusion")
        raise ModelFolderError(f"{path}: an {kind} checkpoint (no SDXL conditioner / size embedding"
                               f"{f', cross-attention width {width}' if width else ''}); vqdm supports SDXL and "
                               "SDXL-Turbo only")
    if header.keys("conditioner.embedders.0.model.") and not header.keys("conditioner.embedders.1."):
        raise ModelFolderError(f"{path}: an SDXL refiner checkpoint (one text encoder, OpenCLIP bigG as "
                               f"conditioner.embedders.0; U-Net width {conv_in[0]}); vqdm supports the SDXL base "
                               "architecture (SDXL, SDXL-Turbo and their fine-tunes) only")
    missing = [p for p in (CLIP_L_PREFIX, CLIP_G_PREFIX) if not header.keys(p)]
    if missing:
        raise ModelFolderError(f"{path}: no text encoder weights under {', '.join(p + '*' for p in missing)}; "
                               "vqdm needs a complete SDXL checkpoint (U-Net and both text encoders)")


# --- the key map ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One tensor of the file: its original-layout name and the diffusers tensor(s) it holds.

    kind: "same" (identical), "conv1x1" (a VAE attention Linear [C, C] stored as a 1x1 conv
    [C, C, 1, 1]), "transpose" (open_clip's text_projection, x @ P, vs a Linear's weight) or
    "qkv" (open_clip's fused attn.in_proj: q, k, v concatenated along rows).
    """

    key: str
    component: str
    names: tuple[str, ...]
    kind: str = "same"


def to_original(entry: Entry, tensors: list[torch.Tensor]) -> torch.Tensor:
    if entry.kind == "qkv":
        return torch.cat(tensors)
    (t,) = tensors
    if entry.kind == "conv1x1":
        return t.reshape(*t.shape, 1, 1)
    if entry.kind == "transpose":
        return t.T
    return t


def from_original(entry: Entry, t: torch.Tensor) -> list[torch.Tensor]:
    if entry.kind == "qkv":
        return list(t.chunk(3))
    if entry.kind == "conv1x1":
        return [t.reshape(t.shape[:2])]
    if entry.kind == "transpose":
        return [t.T.contiguous()]
    return [t]


def _unet_prefixes(cfg: dict) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) of every U-Net block, from the block layout of `cfg`."""
    layers, n = cfg["layers_per_block"], len(cfg["down_block_types"])
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.")]
    idx = 1
    for i in range(n):
        for j in range(layers):
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1.")]
            idx += 1
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{idx}.0.op."))
            idx += 1
    idx = 0
    for i, block in enumerate(cfg["up_block_types"]):
        for j in range(layers + 1):
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0."),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1.")]
            if j == layers and i < n - 1:  # the upsampler follows the attention, when the block has one
                slot = 2 if block.startswith("CrossAttn") else 1
                pairs.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{idx}.{slot}.conv."))
            idx += 1
    return pairs


_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _unet_entries(names: list[str], cfg: dict) -> list[Entry]:
    pairs = _unet_prefixes(cfg)
    out = []
    for name in names:
        prefix, orig = next(((d, o) for d, o in pairs if name.startswith(d)), (None, None))
        if prefix is None:
            raise RuntimeError(f"U-Net tensor {name} has no original-layout name (a diffusers version vqdm does not know?)")
        rest = name[len(prefix):]
        if ".resnets." in prefix:
            head, _, tail = rest.partition(".")
            rest = f"{_UNET_RESNET[head]}.{tail}"
        out.append(Entry(UNET_PREFIX + orig + rest, "unet", (name,)))
    return out


def _vae_key(name: str, levels: int) -> str:
    up = lambda m: f"decoder.up.{levels - 1 - int(m[1])}."  # noqa: E731 - the decoder counts levels from the bottom
    rules: list[tuple[str, str | Callable]] = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.", up),
        (r"^(decoder\.up\.\d+\.)resnets\.", r"\1block."),
        (r"^(decoder\.up\.\d+\.)upsamplers\.0\.", r"\1upsample."),
        (r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
        (r"mid_block\.attentions\.0\.", "mid.attn_1."),
        (r"(attn_1\.)group_norm\.", r"\1norm."), (r"(attn_1\.)to_([qkv])\.", r"\1\2."),
        (r"(attn_1\.)to_out\.0\.", r"\1proj_out."),
        (r"conv_shortcut\.", "nin_shortcut."), (r"conv_norm_out\.", "norm_out."),
    ]
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def _vae_entries(shapes: dict[str, tuple[int, ...]], cfg: dict) -> list[Entry]:
    levels = len(cfg["block_out_channels"])
    return [Entry(VAE_PREFIX + _vae_key(n, levels), "vae", (n,),
                  "conv1x1" if ".attn_1." in _vae_key(n, levels) and len(s) == 2 else "same")
            for n, s in shapes.items()]


_CLIP_G_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                 "self_attn.out_proj": "attn.out_proj"}
_CLIP_G_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
               "text_model.embeddings.position_embedding.weight": "positional_embedding",
               "text_model.final_layer_norm.weight": "ln_final.weight",
               "text_model.final_layer_norm.bias": "ln_final.bias"}


def _clip_g_entries(names: list[str]) -> list[Entry]:
    out = []
    for name in names:
        if name in _CLIP_G_TOP:
            out.append(Entry(CLIP_G_PREFIX + _CLIP_G_TOP[name], "text_encoder_2", (name,)))
            continue
        if name == "text_projection.weight":
            out.append(Entry(CLIP_G_PREFIX + "text_projection", "text_encoder_2", (name,), "transpose"))
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if m is None:
            raise RuntimeError(f"text encoder 2 tensor {name} has no open_clip name")
        block, layer, param = m.groups()
        orig = f"{CLIP_G_PREFIX}transformer.resblocks.{block}."
        if layer in ("self_attn.k_proj", "self_attn.v_proj"):
            continue  # fused into the q_proj entry
        if layer == "self_attn.q_proj":
            qkv = tuple(name.replace("q_proj", p) for p in ("q_proj", "k_proj", "v_proj"))
            out.append(Entry(f"{orig}attn.in_proj_{param}", "text_encoder_2", qkv, "qkv"))
        else:
            out.append(Entry(f"{orig}{_CLIP_G_LAYER[layer]}.{param}", "text_encoder_2", (name,)))
    return out


def key_map(components: dict[str, torch.nn.Module], vae_config: dict, unet_config: dict) -> list[Entry]:
    """Every tensor of the original layout, for these diffusers components (any may be left out)."""
    entries = []
    if "unet" in components:
        entries += _unet_entries(list(components["unet"].state_dict()), unet_config)
    if "text_encoder" in components:
        # The file's CLIP-L names keep HF's "text_model." level, which transformers 5 no longer has in the module.
        entries += [Entry(CLIP_L_PREFIX + (n if n.startswith("text_model.") else "text_model." + n), "text_encoder", (n,))
                    for n in components["text_encoder"].state_dict()]
    if "text_encoder_2" in components:
        entries += _clip_g_entries(list(components["text_encoder_2"].state_dict()))
    if "vae" in components:
        entries += _vae_entries({n: tuple(t.shape) for n, t in components["vae"].state_dict().items()}, vae_config)
    return entries


# --- presets, as meta-device components --------------------------------------------------------

def meta_components(preset: Preset) -> dict[str, torch.nn.Module]:
    """The preset's U-Net, text encoders and VAE on the meta device: shapes, no memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # deferred: seconds to import
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return {"unet": UNet2DConditionModel.from_config(preset.unet),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**preset.text_encoder)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**preset.text_encoder_2)),
                "vae": AutoencoderKL.from_config(preset.vae)}


@lru_cache(maxsize=8)
def _preset_layout(name: str) -> tuple[tuple[Entry, ...], dict[str, tuple[int, ...]]]:
    """(key map, original-layout shapes) of a packaged preset."""
    preset = PRESETS[name]
    comps = meta_components(preset)
    entries = key_map(comps, preset.vae, preset.unet)
    sds = {c: m.state_dict() for c, m in comps.items()}
    shapes = {e.key: tuple(to_original(e, [sds[e.component][n] for n in e.names]).shape) for e in entries}
    return tuple(entries), shapes


def _mismatch(header: SafetensorsHeader, shapes: dict[str, tuple[int, ...]], with_vae: bool) -> str | None:
    """Why the file is not this layout (the first difference), or None when every key and shape agree."""
    want = {k: s for k, s in shapes.items() if with_vae or not k.startswith(VAE_PREFIX)}
    have = {k: header.tensors[k].shape for p in PREFIXES.values() for k in header.keys(p) if k not in IGNORED_KEYS}
    if not with_vae:
        have = {k: s for k, s in have.items() if not k.startswith(VAE_PREFIX)}
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    if missing:
        return f"{len(missing)} tensor(s) missing, e.g. {missing[0]}"
    if extra:
        return f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}"
    bad = next((k for k in want if tuple(have[k]) != want[k]), None)
    return None if bad is None else f"{bad} is {list(have[bad])}, expected {list(want[bad])}"


@dataclass(frozen=True)
class SingleFileInfo:
    """What a checkpoint file is: its preset (architecture + family defaults), family and why, contents."""

    path: Path
    preset: str
    family: str
    family_source: str
    has_vae: bool
    ema_tensors: int
    other_tensors: int  # outside the known prefixes and not EMA: ignored
    dtype: str


def _family(header: SafetensorsHeader, options: SingleFileOptions) -> tuple[str, str]:
    if options.family:
        return options.family, "from --family"
    meta = header.metadata
    if meta.get(FAMILY_KEY) in FAMILIES:
        return meta[FAMILY_KEY], f"from the file's {FAMILY_KEY} metadata"
    for key in ("modelspec.architecture", "modelspec.title"):
        if "turbo" in meta.get(key, "").lower():
            return "sdxl-turbo", f"from the file's {key} metadata ({meta[key]!r})"
    if options.fallback_family in FAMILIES:  # an unknown --preset is refused by its own command
        return options.fallback_family, f"{options.fallback_source}: neither --family nor the file's metadata say"
    return "sdxl", "weights cannot tell Turbo from SDXL and the metadata does not say; pass --family sdxl-turbo for a Turbo model"


def describe(path: str | Path, options: SingleFileOptions | None = None) -> SingleFileInfo:
    """Check a checkpoint file (header only) and say what it is; ModelFolderError naming what is wrong."""
    options = options or SingleFileOptions()
    header = read_header(path)
    if is_vqdm_artifact_file(header):
        raise ModelFolderError(f"{path}: a compressed vqdm artifact, not a dense checkpoint")
    refuse_unsupported(header)
    family, source = _family(header, options)
    has_vae = bool(header.keys(VAE_PREFIX))
    candidates = [options.config] if options.config else [n for n in PRESETS if PRESETS[n].family == family] + \
        [n for n in PRESETS if PRESETS[n].family != family]
    reasons = {}
    conv_in = header.shape(UNET_PREFIX + "input_blocks.0.0.weight")
    for name in candidates:
        width = PRESETS[name].unet["block_out_channels"][0]
        if conv_in[0] != width:  # cheap first: no need to lay out a full-size preset for a tiny file
            reasons[name] = f"U-Net width {conv_in[0]}, expected {width}"
            continue
        reasons[name] = _mismatch(header, _preset_layout(name)[1], has_vae)
        if reasons[name] is None:
            break
    else:
        shown = "; ".join(f"{n}: {r}" for n, r in reasons.items())
        raise ModelFolderError(f"{path}: an SDXL-like checkpoint whose shapes match no packaged architecture "
                               f"({shown})")
    known = tuple(PREFIXES.values()) + (EMA_PREFIX,)
    unet_dtypes = [header.tensors[k].dtype for k in header.keys(UNET_PREFIX)]
    return SingleFileInfo(Path(path), name, family, source, has_vae, len(header.keys(EMA_PREFIX)),
                          sum(not k.startswith(known) for k in header.tensors),
                          max(set(unet_dtypes), key=unet_dtypes.count))


def preset_for(info: SingleFileInfo) -> Preset:
    """The matched preset, with the scheduler and sampling defaults of the file's family."""
    preset = Preset.from_name(info.preset)
    if preset.family != info.family:
        twin = next((p for p in PRESETS.values() if p.family == info.family and p.unet == preset.unet
                     and p.text_encoder_2 == preset.text_encoder_2), None)
        if twin is not None:
            return Preset.from_name(twin.name)
        donor = next(p for p in PRESETS.values() if p.family == info.family)
        preset.family, preset.scheduler = info.family, dict(donor.scheduler)
        preset.steps, preset.guidance = donor.steps, donor.guidance
    return preset


def unet_config(path: str | Path, options: SingleFileOptions | None = None) -> dict:
    """The diffusers U-Net config of a checkpoint file."""
    return dict(preset_for(describe(path, options)).unet)


# --- reading ----------------------------------------------------------------------------------

def _assign(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Load into a meta-device module by assignment (no second copy), then fill its non-persistent buffers."""
    module.load_state_dict(tensors, strict=True, assign=True)
    for sub in module.modules():  # CLIP's position ids are a non-persistent buffer: rebuilt, never stored
        ids = sub._buffers.get("position_ids")
        if ids is not None and ids.is_meta:
            sub.register_buffer("position_ids", torch.arange(ids.shape[-1]).expand(ids.shape), persistent=False)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: {left[0]} was not loaded")


def _read_tensors(header: SafetensorsHeader, entries: list[Entry], dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """The entries' tensors by component and diffusers name, floats cast to `dtype`. Plain reads, not a
    memory map: the file's pages are not held (nor counted) in the process while the model fills."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    with open(header.path, "rb") as f:
        for e in entries:
            entry = header.tensors[e.key]
            stored, shape = entry.dtype, entry.shape
            buf = bytearray(entry.end - entry.start)
            f.seek(entry.start)
            if f.readinto(buf) != len(buf):
                raise ModelFolderError(f"{header.path}: truncated while reading {e.key}")
            t = torch.frombuffer(buf, dtype=_DTYPES[stored]).reshape(shape) if buf else \
                torch.empty(shape, dtype=_DTYPES[stored])
            if t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
            out.setdefault(e.component, {}).update(zip(e.names, from_original(e, t)))
    return out


def load_vae(source: str | Path, preset: Preset, dtype: torch.dtype = torch.float32):
    """A VAE from a diffusers folder (a pipeline's or a VAE's) or a .safetensors file, original or diffusers layout."""
    from diffusers import AutoencoderKL

    source = Path(source)
    if source.is_dir():
        folder = source / "vae" if (source / "vae").is_dir() else source
        try:
            return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise ModelFolderError(f"--vae {source}: not a diffusers VAE folder ({e})") from None
    header = read_header(source)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(preset.vae)
    entries = _vae_entries({n: tuple(t.shape) for n, t in vae.state_dict().items()}, preset.vae)
    names = set(header.tensors)
    if all(e.names[0] in names for e in entries):  # diffusers layout: the names are the state dict's
        entries = [Entry(e.names[0], "vae", e.names) for e in entries]
    else:
        bare = not header.keys(VAE_PREFIX)
        entries = [Entry(e.key[len(VAE_PREFIX):] if bare else e.key, "vae", e.names, e.kind) for e in entries]
        missing = [e.key for e in entries if e.key not in names]
        if missing:
            raise ModelFolderError(f"--vae {source}: not an SDXL VAE of this architecture ({len(missing)} tensor(s) "
                                   f"missing, e.g. {missing[0]})")
    tensors = _read_tensors(header, entries, dtype)["vae"]
    bad = next((n for n, t in vae.state_dict().items() if tuple(tensors[n].shape) != tuple(t.shape)), None)
    if bad:
        raise ModelFolderError(f"--vae {source}: {bad} is {list(tensors[bad].shape)}, this architecture's is "
                               f"{list(vae.state_dict()[bad].shape)}")
    _assign(vae, tensors, f"--vae {source}")
    return vae.eval()


def load_single_file(path: str | Path, options: SingleFileOptions | None = None, dtype: torch.dtype = torch.float32,
                     device: str = "cpu", unet: torch.nn.Module | None = None):
    """A StableDiffusionXLPipeline from an original-layout checkpoint file, offline. `unet`: a U-Net of the
    file's architecture to use instead of the file's (whose tensors are then never read), e.g. a VQ U-Net
    built apart, so that only the file's text encoders and VAE are loaded."""
    from diffusers import StableDiffusionXLPipeline

    from vqdm.models.schedulers import scheduler_from
    from vqdm.models.tokenizers import build_clip_tokenizer

    options = options or SingleFileOptions()
    path = Path(path)
    info = describe(path, options)
    if not info.has_vae and not options.vae:
        raise ModelFolderError(f"{path}: no VAE baked in (no first_stage_model.* tensors): name one with "
                               "--vae FILE_OR_FOLDER")
    if info.ema_tensors:
        log.info("%s: ignoring %d EMA tensors (model_ema.*); loading the model.diffusion_model weights",
                 path, info.ema_tensors)
    if info.other_tensors:
        log.info("%s: ignoring %d tensors outside the U-Net, text encoders and VAE", path, info.other_tensors)
    preset = preset_for(info)
    comps = meta_components(preset)
    if unet is not None:
        _check_same_architecture(unet, preset, path)
        del comps["unet"]
    use_file_vae = info.has_vae and not options.vae
    if not use_file_vae:
        if info.has_vae:
            log.info("%s: using --vae %s instead of the VAE baked into the file", path, options.vae)
        del comps["vae"]
    entries = key_map(comps, preset.vae, preset.unet)
    tensors = _read_tensors(read_header(path), entries, dtype)
    for name, module in comps.items():
        _assign(module, tensors.pop(name), f"{path} ({name})")
        module.eval()
    vae = comps["vae"] if use_file_vae else load_vae(options.vae, preset, dtype)
    scheduler = preset.scheduler
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=comps["text_encoder"], text_encoder_2=comps["text_encoder_2"],
        tokenizer=build_clip_tokenizer(num_merges=preset.bpe_merges),
        tokenizer_2=build_clip_tokenizer(pad_token="!", num_merges=preset.bpe_merges),
        unet=comps["unet"] if unet is None else unet, scheduler=scheduler_from(scheduler["_class_name"],
                                                     {k: v for k, v in scheduler.items() if k != "_class_name"}))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)  # every tensor is in `dtype` already


def _check_same_architecture(unet: torch.nn.Module, preset: Preset, path: Path) -> None:
    """Refuse a stand-in U-Net whose config differs from the file's in any key the file's preset sets."""
    mine = json.loads(json.dumps(dict(unet.config), default=list))  # tuples and lists compare alike
    want = json.loads(json.dumps(preset.unet, default=list))
    diff = sorted(k for k in want if not k.startswith("_") and mine.get(k) != want[k])
    if diff:
        raise ModelFolderError(f"{path}: the U-Net given in place of the file's has another architecture "
                               f"({diff[0]}: {mine.get(diff[0])!r}, the file's {want[diff[0]]!r})")


# --- writing ----------------------------------------------------------------------------------

def _write_streaming(out: Path, items: list[tuple[str, Callable[[], torch.Tensor], torch.dtype, tuple]],
                     metadata: dict[str, str]) -> None:
    """A safetensors file written one tensor at a time: never more than one converted tensor in memory."""
    raw = encode_header([(key, _DTYPE_NAMES[dtype], shape) for key, _, dtype, shape in items], metadata)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            for key, get, dtype, shape in items:
                t = get().detach().to("cpu", dtype).contiguous()
                assert tuple(t.shape) == tuple(shape), key
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        tmp.replace(out)  # an interrupted write never looks like a finished file
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_single_file(pipe, out: str | Path, dtype: torch.dtype = torch.float16, family: str | None = None,
                      include_vae: bool = True, metadata: bool = True) -> Path:
    """Write `pipe` (a dense StableDiffusionXLPipeline) as one original-layout .safetensors file.

    `family` ("sdxl" / "sdxl-turbo") goes into the metadata (vqdm.family, and modelspec.architecture
    as SDXL tools write it) unless `metadata` is False; `include_vae` False leaves first_stage_model.* out.
    """
    from vqdm.models.quantized_unet import vq_modules

    out = Path(out)
    if is_pickle_name(out):
        raise ValueError(f"{out}: a {out.suffix} name, which vqdm takes for a pickle and refuses to read: name the "
                         "file .safetensors")
    if vq_modules(pipe.unet):
        raise ValueError(f"{out}: the pipeline's U-Net holds VQ layers; a dense checkpoint holds dense weights "
                         "(a compressed model is written by `vqdm export --single-file`)")
    comps = {c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2", "vae")}
    if not include_vae:
        del comps["vae"]
    vae_config = dict(pipe.vae.config)
    entries = key_map(comps, vae_config, dict(pipe.unet.config))
    sds = {c: m.state_dict() for c, m in comps.items()}
    items = []
    for e in entries:
        ts = [sds[e.component][n] for n in e.names]
        shape = tuple(to_original(e, [t.to("meta") for t in ts]).shape)
        keep = dtype if ts[0].is_floating_point() else ts[0].dtype
        items.append((e.key, lambda e=e, ts=ts: to_original(e, ts), keep, shape))
    meta = {}
    if metadata:
        meta = {"modelspec.architecture": "stable-diffusion-xl-v1-base", "modelspec.implementation": "sgm",
                "vqdm.written_by": "vqdm"}
        if family:
            if family not in FAMILIES:
                raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
            meta[FAMILY_KEY] = family
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_streaming(out, items, meta)
    return out
