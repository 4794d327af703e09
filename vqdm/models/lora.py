"""LoRA adapters on VQ (and dense) layers, computed unmerged: y = layer(x) + scale · B(A(x)).

The compressed weights are never touched and never decoded into a merged copy; the VQ kernels run
exactly as without an adapter, and the low-rank branch is added to their output by a forward hook.
Layers that stayed dense (conv_in, the time embedding, the text encoders) get the same branch on
their ordinary nn.Linear / nn.Conv2d forward.

Reading a file and its key dialects (diffusers/PEFT, kohya-ss) is `vqdm.models.lora_keys`; this
module matches the grouped keys to a pipeline's layers (`parse_lora`, `load_lora`) and applies them
(`LoraRuntime`).

Shapes (r = rank): Linear down [r, in], up [out, r]; Conv2d down [r, C_in, k_h, k_w] (the layer's
kernel, stride, padding), up [out, r, 1, 1]. Stored in fp16 (or bf16); cast to the layer's compute
dtype once per activated adapter set.

Use: `rt = LoraRuntime(pipe); rt.add(load_lora(path, pipe, "style"))`, then
`with rt.activate([("style", 0.8)]): pipe(...)`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vqdm.models.lora_keys import COMPONENTS, LoraError, group_lora_keys, lora_scale, read_lora_file
from vqdm.models.vq_layers import VQConv2d, VQLinear

MAX_ABS_SCALE = 2.0  # requests may weight an adapter in [-2, 2]


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
        """What a client may know of the adapter (GET /v1/models): never its file's path."""
        comps = sorted({lay.component for lay in self.layers.values()}, key=COMPONENTS.index)
        return {"name": self.name, "rank": self.rank, "layers": len(self.layers), "components": comps,
                "bytes": self.nbytes, "scale_range": [-MAX_ABS_SCALE, MAX_ABS_SCALE]}


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


def _fit_shapes(key: str, layer: nn.Module, where: str, down: torch.Tensor,
                up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`down` / `up` reshaped to the layer's LoRA shapes (1x1 convs stored as matrices and back)."""
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
                        f"{where} ({_describe(layer)}), which needs {want_down} / {want_up}: "
                        "an adapter for another base model?")
    return down, up


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], pipe, name: str, source: str = "",
               dtype: torch.dtype = torch.float16) -> LoraAdapter:
    """Match a LoRA state dict to `pipe`'s layers; every problem is an error naming the key."""
    keys = group_lora_keys(tensors, metadata, getattr(pipe.unet, "config", None))
    roots = {c: getattr(pipe, c, None) for c in COMPONENTS}
    maps: dict[str, dict[str, nn.Module]] = {}
    canonical: dict[str, dict[int, str]] = {}
    adapter = LoraAdapter(name=name, source=source)
    for (comp, module), g in keys.groups.items():
        key = g["key"]
        if "down" not in g or "up" not in g:
            missing = "down (lora_A / lora_down)" if "down" not in g else "up (lora_B / lora_up)"
            raise LoraError(f"LoRA key {key!r}: has no {missing} half")
        root = roots.get(comp)
        if root is None:
            raise LoraError(f"LoRA key {key!r} targets {comp}, which this pipeline does not have")
        if comp not in maps:
            lmap = _layer_map(root)
            maps[comp] = {**lmap, **{n.replace(".", "_"): m for n, m in lmap.items()}} if keys.kohya else lmap
        layer = maps[comp].get(module)
        if layer is None:
            raise LoraError(f"LoRA key {key!r} matches no Linear/Conv2d layer of the {comp} "
                            f"(looked for {comp}.{module}): an adapter for another base model?")
        down, up = _fit_shapes(key, layer, f"{comp}.{module}", g["down"], g["up"])
        scale = lora_scale(g, comp, module, keys.configs, down.shape[0])
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


def _device(m: nn.Module) -> torch.device:
    return m.codes.device if isinstance(m, (VQLinear, VQConv2d)) else m.weight.device


def build_branch(module: nn.Module, layers: Sequence[tuple[LoraLayer, float]]) -> _Branch:
    """One branch computing sum_i scale_i · layer_i.scale · B_i(A_i(x)) for `module`."""
    dtype = _compute_dtype(module)
    device = _device(module)
    down = torch.cat([lay.down for lay, _ in layers]).to(device=device, dtype=dtype)
    up = torch.cat([lay.up.to(torch.float32) * (s * lay.scale) for lay, s in layers], dim=1).to(device=device,
                                                                                                   dtype=dtype)
    conv = None if down.dim() == 2 else (module.stride, module.padding, module.dilation)
    return _Branch(down.contiguous(), up.contiguous(), conv)


class LoraRuntime:
    """The adapters loaded for one pipeline and the set active on it now.

    A forward hook on every adapted layer adds the active branch to the layer's output; with no set
    active the hook returns at once. Activation is not thread-safe: one pipeline runs one batch at
    a time (the server's device worker, or `vqdm generate`).

    Under torch.compile(fullgraph=True) the hooks trace into the graph, the branch factors as graph
    inputs. Dynamo guards on the active-branch dict: the first activation recompiles once, other
    scales of the same adapters do not, a new total rank recompiles once and then the rank is
    dynamic; deactivating reuses the no-LoRA graph (tests/models/test_compile.py)."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.adapters: dict[str, LoraAdapter] = {}
        self._modules: dict[str, nn.Module] = {}
        self._hooks: list = []
        self._branches: dict[str, _Branch] = {}  # what the hooks add now (empty outside `activate`)
        self._built: tuple[tuple, dict[str, _Branch]] = ((), {})  # the last set built, reused by the next batch

    @property
    def nbytes(self) -> int:
        """The adapters at rest (fp16)."""
        return sum(a.nbytes for a in self.adapters.values())

    @property
    def cached_nbytes(self) -> int:
        """The branches of the last set built, kept for the next batch in compute dtype (fp32 on
        CPU: twice the adapters' fp16 at rest)."""
        return sum(t.numel() * t.element_size() for b in self._built[1].values() for t in (b.down, b.up))

    def built_nbytes(self, adapter: LoraAdapter) -> int:
        """What `adapter` adds to a built branch set on this pipeline (`cached_nbytes`): its weights
        in each adapted layer's compute dtype."""
        return sum((lay.down.numel() + lay.up.numel()) * _compute_dtype(self._module(target)).itemsize
                   for target, lay in adapter.layers.items())

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
            device = _device(self._modules[target])
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
