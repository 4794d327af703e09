"""LoRA adapters on VQ (and dense) layers, computed unmerged: y = layer(x) + scale · B(A(x)).

The compressed weights are never touched and never decoded into a merged copy; the VQ kernels run
exactly as without an adapter, and the low-rank branch is added to their output by a forward hook.
Layers that stayed dense (conv_in, the time embedding, the text encoders) get the same branch on
their ordinary nn.Linear / nn.Conv2d forward.

Files read (safetensors only; pickled .bin/.pt/.ckpt files are refused, they can run code):
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `lora_B.weight` (also without the `unet.`
  prefix, with PEFT's `base_model.model.` prefix, and the older `.lora.down/.up`,
  `.lora_linear_layer.down/.up` and `attn.processor.to_q_lora.down` spellings), alphas from the
  file's `lora_adapter_metadata` (diffusers >= 0.34) or `<module>.alpha` keys, else alpha = rank;
  `text_encoder.` / `text_encoder_2.` keys go to the two (dense) text encoders.
- kohya-ss: `lora_unet_<module_with_underscores>.lora_down.weight` / `lora_up.weight` / `alpha`,
  `lora_te1_…` / `lora_te2_…` (`lora_te_…` = te1); module names in diffusers spelling or in the
  sgm spelling kohya uses for SDXL (`input_blocks_4_1_…`), which diffusers' own mapping renames.

Shapes (r = rank): Linear down [r, in], up [out, r]; Conv2d down [r, C_in, k_h, k_w] (the layer's
kernel, stride, padding), up [out, r, 1, 1]. Stored in fp16 (or bf16); cast to the layer's compute
dtype once per activated adapter set.

Use: `rt = LoraRuntime(pipe); rt.add(load_lora(path, pipe, "style"))`, then
`with rt.activate([("style", 0.8)]): pipe(...)`.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vqdm.errors import VQDMError
from vqdm.models.vq_layers import VQConv2d, VQLinear

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
MAX_ABS_SCALE = 2.0  # requests may weight an adapter in [-2, 2]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
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
class LoraLayer:
    """One adapted layer: `component` ('unet', 'text_encoder', 'text_encoder_2') and module path."""

    component: str
    module: str
    down: torch.Tensor  # [r, in] or [r, C_in, k_h, k_w]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    scale: float  # alpha / r (the file's own weighting); the request's scale multiplies it
    key: str  # the file key it came from, for error messages

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def target(self) -> str:
        return f"{self.component}.{self.module}"

    def delta_weight(self) -> torch.Tensor:
        """scale · B·A as a dense weight shaped like the layer's (for references and tests only)."""
        down, up = self.down.float(), self.up.float()
        if down.dim() == 2:
            return self.scale * up @ down
        return self.scale * torch.einsum("or,rikl->oikl", up.flatten(1), down)


@dataclass
class LoraAdapter:
    name: str
    source: str
    layers: dict[str, LoraLayer] = field(default_factory=dict)  # target -> layer

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for lay in self.layers.values() for t in (lay.down, lay.up))

    @property
    def rank(self) -> int:
        return max((lay.rank for lay in self.layers.values()), default=0)

    def card(self) -> dict:
        comps = sorted({lay.component for lay in self.layers.values()}, key=COMPONENTS.index)
        return {"name": self.name, "rank": self.rank, "layers": len(self.layers), "components": comps,
                "bytes": self.nbytes, "source": self.source}


# -- reading files ----------------------------------------------------------------------------------
def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors LoRA file, with errors that say what is wrong."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    with path.open("rb") as f:
        head = f.read(8)
    if path.suffix.lower() in _PICKLE_SUFFIXES or head[:2] in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04",
                                                               b"\x80\x05"):
        raise LoraError(f"{path}: looks like a pickled PyTorch file; vqdm loads LoRAs only from .safetensors "
                        "(pickles can run code when loaded). Convert it with safetensors.torch.save_file.")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {e}") from None
    if not tensors:
        raise LoraError(f"{path}: the file holds no tensors")
    return tensors, metadata


def _metadata_alphas(metadata: dict[str, str]) -> dict[str, dict]:
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


# -- resolving against a pipeline ----------------------------------------------------------------------
_LAYER_TYPES = (nn.Linear, nn.Conv2d, VQLinear, VQConv2d)


def _layer_map(root: nn.Module) -> dict[str, nn.Module]:
    """Every adaptable layer by path, plus 'text_model.'-less/-ful aliases (transformers moved it)."""
    out = {n: m for n, m in root.named_modules() if isinstance(m, _LAYER_TYPES)}
    for n, m in list(out.items()):
        alias = n.removeprefix("text_model.") if n.startswith("text_model.") else "text_model." + n
        out.setdefault(alias, m)
    return out


def _expected_shapes(m: nn.Module, rank: int) -> tuple[tuple, tuple]:
    if isinstance(m, (nn.Linear, VQLinear)):
        return (rank, m.in_features), (m.out_features, rank)
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        raise ValueError("grouped convolutions cannot take a LoRA")
    kh, kw = m.kernel_size
    return (rank, m.in_channels, kh, kw), (m.out_channels, rank, 1, 1)


def _describe(m: nn.Module) -> str:
    if isinstance(m, (nn.Linear, VQLinear)):
        return f"{type(m).__name__} {m.in_features}->{m.out_features}"
    return f"{type(m).__name__} {m.in_channels}->{m.out_channels}, kernel {tuple(m.kernel_size)}"


def _scale_for(group: dict, comp: str, module: str, meta: dict[str, dict], rank: int) -> float:
    cfg = meta.get(comp, {})
    alpha = group.get("alpha")
    if alpha is not None:
        alpha = float(alpha.float().reshape(-1)[0])
    else:
        pattern = cfg.get("alpha_pattern") or {}
        hit = [v for k, v in pattern.items() if module == k or module.endswith("." + k)]
        alpha = float(hit[0]) if hit else float(cfg.get("lora_alpha", rank))
    return alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], pipe, name: str, source: str = "",
               dtype: torch.dtype = torch.float16) -> LoraAdapter:
    """Match a LoRA state dict to `pipe`'s layers; every problem is an error naming the key."""
    kohya = _is_kohya(tensors)
    groups = _group_kohya(tensors, getattr(pipe.unet, "config", None)) if kohya else _group_diffusers(tensors)
    meta = {} if kohya else _metadata_alphas(metadata)
    roots = {c: getattr(pipe, c, None) for c in COMPONENTS}
    maps: dict[str, dict[str, nn.Module]] = {}
    canonical: dict[str, dict[int, str]] = {}
    adapter = LoraAdapter(name=name, source=source)
    for (comp, module), g in groups.items():
        key = g["key"]
        if "down" not in g or "up" not in g:
            missing = "down (lora_A / lora_down)" if "down" not in g else "up (lora_B / lora_up)"
            raise LoraError(f"LoRA key {key!r}: has no {missing} half")
        root = roots.get(comp)
        if root is None:
            raise LoraError(f"LoRA key {key!r} targets {comp}, which this pipeline does not have")
        if comp not in maps:
            lmap = _layer_map(root)
            maps[comp] = {**lmap, **{n.replace(".", "_"): m for n, m in lmap.items()}} if kohya else lmap
        layer = maps[comp].get(module)
        if layer is None:
            raise LoraError(f"LoRA key {key!r} matches no Linear/Conv2d layer of the {comp} "
                            f"(looked for {comp}.{module}): an adapter for another base model?")
        down, up = g["down"], g["up"]
        rank = down.shape[0]
        try:
            want_down, want_up = _expected_shapes(layer, rank)
        except ValueError as e:
            raise LoraError(f"LoRA key {key!r}: {e}") from None
        if len(want_down) == 2 and down.dim() == 4 and down.shape[2:] == (1, 1) and up.dim() == 4:
            down, up = down.flatten(1), up.flatten(1)  # a 1x1-conv LoRA (SD 1.x proj_in) on a Linear layer
        if tuple(down.shape) == (rank, want_down[1]) and len(want_down) == 4 and want_down[2:] == (1, 1):
            down = down.reshape(want_down)  # a 1x1 conv stored as a matrix
        if len(want_up) == 4 and tuple(up.shape) == want_up[:2]:
            up = up.reshape(want_up)
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise LoraError(f"LoRA key {key!r}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit layer "
                            f"{comp}.{module} ({_describe(layer)}), which needs {want_down} / {want_up}: "
                            "an adapter for another base model?")
        scale = _scale_for(g, comp, module, meta, rank)
        real = canonical.setdefault(comp, {id(m): n for n, m in root.named_modules()})[id(layer)]
        adapter.layers[f"{comp}.{real}"] = LoraLayer(comp, real, down.to(dtype).contiguous(),
                                                     up.to(dtype).contiguous(), scale, key)
    return adapter


def load_lora(path: str | Path, pipe, name: str | None = None, dtype: torch.dtype = torch.float16) -> LoraAdapter:
    """Read a .safetensors LoRA and match it to `pipe` (named after the file stem by default)."""
    path = Path(path)
    tensors, metadata = read_lora_file(path)
    try:
        return parse_lora(tensors, metadata, pipe, name or path.stem, str(path), dtype)
    except LoraError as e:
        raise LoraError(f"{path}: {e}") from None


def lora_files(path: str | Path) -> list[Path]:
    """A .safetensors file, or every .safetensors file of a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" and p.is_file())
        if not files:
            raise LoraError(f"{path}: folder holds no .safetensors LoRA files")
        return files
    return [path]


# -- applying, unmerged ---------------------------------------------------------------------------------
@dataclass
class _Branch:
    """The active adapters of one layer, concatenated along the rank with scales folded into `up`."""

    down: torch.Tensor  # [R, in] | [R, C_in, k_h, k_w], R = sum of ranks
    up: torch.Tensor  # [out, R] | [out, R, 1, 1]
    conv: tuple | None  # (stride, padding, dilation) of the layer, None for a linear layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.down.dtype)
        if self.conv is None:
            return F.linear(F.linear(x, self.down), self.up)
        stride, padding, dilation = self.conv
        return F.conv2d(F.conv2d(x, self.down, None, stride, padding, dilation), self.up)


def _compute_dtype(m: nn.Module) -> torch.dtype:
    return m.codebooks.dtype if isinstance(m, (VQLinear, VQConv2d)) else m.weight.dtype


def build_branch(module: nn.Module, layers: Sequence[tuple[LoraLayer, float]]) -> _Branch:
    """One branch computing sum_i scale_i · layer_i.scale · B_i(A_i(x)) for `module`."""
    dtype = _compute_dtype(module)
    device = module.codes.device if isinstance(module, (VQLinear, VQConv2d)) else module.weight.device
    down = torch.cat([lay.down for lay, _ in layers]).to(device=device, dtype=dtype)
    up = torch.cat([lay.up.to(torch.float32) * (s * lay.scale) for lay, s in layers], dim=1).to(device=device,
                                                                                                   dtype=dtype)
    conv = None if down.dim() == 2 else (module.stride, module.padding, module.dilation)
    return _Branch(down.contiguous(), up.contiguous(), conv)


class LoraRuntime:
    """The adapters loaded for one pipeline and the set active on it now.

    A forward hook on every adapted layer adds the active branch to the layer's output; with no set
    active the hook returns at once. Activation is not thread-safe: one pipeline runs one batch at
    a time (the server's device worker, or `vqdm generate`)."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.adapters: dict[str, LoraAdapter] = {}
        self._modules: dict[str, nn.Module] = {}
        self._hooks: list = []
        self._branches: dict[str, _Branch] = {}  # what the hooks add now (empty outside `activate`)
        self._built: tuple[tuple, dict[str, _Branch]] = ((), {})  # the last set built, reused by the next batch

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.adapters.values())

    def _module(self, target: str) -> nn.Module:
        comp, _, path = target.partition(".")
        return getattr(self.pipe, comp).get_submodule(path)

    def add(self, adapter: LoraAdapter) -> None:
        if adapter.name in self.adapters:
            raise LoraError(f"LoRA {adapter.name!r} is loaded twice; give each adapter its own name")
        for target, lay in adapter.layers.items():
            if target not in self._modules:
                module = self._modules[target] = self._module(target)
                self._hooks.append(module.register_forward_hook(self._hook_for(target)))
            device = self._modules[target].codes.device if isinstance(self._modules[target], (VQLinear, VQConv2d)) \
                else self._modules[target].weight.device
            lay.down, lay.up = lay.down.to(device), lay.up.to(device)
        self.adapters[adapter.name] = adapter

    def remove(self, name: str) -> None:
        """Forget an adapter (its layers' hooks stay, adding nothing unless another adapter is active)."""
        del self.adapters[name]
        self._built = ((), {})

    def _hook_for(self, target: str):
        def hook(_module, args, output):
            branch = self._branches.get(target)
            if branch is None:
                return None
            return output + branch(args[0]).to(output.dtype)

        return hook

    @contextlib.contextmanager
    def activate(self, choice: Sequence[tuple[str, float]]) -> Iterator[None]:
        """Within the block, every adapted layer adds sum over `choice` of scale · B(A(x))."""
        choice = tuple((n, float(s)) for n, s in choice if s != 0.0)
        unknown = [n for n, _ in choice if n not in self.adapters]
        if unknown:
            raise LoraError(f"LoRA {unknown[0]!r} is not loaded; loaded: {', '.join(self.adapters) or 'none'}")
        if choice != self._built[0]:
            per_target: dict[str, list[tuple[LoraLayer, float]]] = {}
            for name, scale in choice:
                for target, lay in self.adapters[name].layers.items():
                    per_target.setdefault(target, []).append((lay, scale))
            self._built = (choice, {t: build_branch(self._modules[t], layers) for t, layers in per_target.items()})
        self._branches = self._built[1]
        try:
            yield
        finally:
            self._branches = {}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._modules, self._branches, self._built = [], {}, {}, ((), {})
