"""torch.compile(fullgraph=True) of VQ U-Nets. The VQ layers are `vqdm::` custom ops, one graph node
each, so the tiny SDXL / SDXL-Turbo VQ U-Nets compile whole (fullgraph=True raises on any graph
break) with and without LoRA adapters active and with a frozen weight cache, and equal eager.

Graph checks use the aot_eager / eager backends: inductor's C++ compile of a whole U-Net takes
minutes on the 2-core CI box. One inductor run, on a small VQ block, checks generated code
numerically. The recompiles that a LoRA activation or a cache change causes are pinned on that
block, since compiled serving relies on them.
"""
from __future__ import annotations

import contextlib
import types

import pytest
import torch
import torch._dynamo.testing
import torch._inductor.config
import torch.nn as nn
import torch.nn.functional as F

from vqdm.models import build_unet, quantize_layers
from vqdm.models.configs import PRESETS
from vqdm.models.lora import LoraAdapter, LoraLayer, LoraRuntime
from vqdm.models.quantized_unet import make_vq_module, vq_modules
from vqdm.models.weight_cache import NotCompilableError, compile_blocker, install_weight_cache

REL_TOL = 1e-5  # fp32: the graph runs the same kernels as eager, op by op


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def random_adapter(name: str, modules: dict[str, nn.Module], rank: int, seed: int) -> LoraAdapter:
    """A LoRA on the given layers (random fp16 factors, as `load_lora` would store them)."""
    gen = torch.Generator().manual_seed(seed)
    adapter = LoraAdapter(name, "")
    for path, m in modules.items():
        if hasattr(m, "in_features"):
            down, up = torch.randn(rank, m.in_features, generator=gen), torch.randn(m.out_features, rank, generator=gen)
        else:
            kh, kw = m.kernel_size
            down = torch.randn(rank, m.in_channels, kh, kw, generator=gen)
            up = torch.randn(m.out_channels, rank, 1, 1, generator=gen)
        adapter.layers[f"unet.{path}"] = LoraLayer("unet", path, (0.1 * down).half(), (0.1 * up).half(), 0.5, path)
    return adapter


# -- the tiny VQ U-Nets ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vq_unet(simple_quantizer):
    # tiny-sdxl and tiny-sdxl-turbo share one U-Net config; they differ in the batch it sees (CFG).
    assert PRESETS["tiny-sdxl"].unet == PRESETS["tiny-sdxl-turbo"].unet
    unet = build_unet("tiny-sdxl", seed=0)
    quantize_layers(unet, 2, simple_quantizer(2))
    return unet


def unet_inputs(preset: str, seed: int = 0) -> dict:
    """One denoising step's U-Net arguments for `preset` (two rows under CFG, one for Turbo)."""
    p = PRESETS[preset]
    rows, size, gen = (2 if p.uses_cfg else 1), p.unet["sample_size"], torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(rows, p.unet["in_channels"], size, size, generator=gen),
                timestep=torch.tensor(500.0),
                encoder_hidden_states=torch.randn(rows, 77, p.unet["cross_attention_dim"], generator=gen),
                added_cond_kwargs={"text_embeds": torch.randn(rows, p.text_encoder_2["projection_dim"], generator=gen),
                                   "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * rows)})


def compiled_and_eager(unet: nn.Module, kw: dict, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend=backend, fullgraph=True)  # any graph break raises
    with torch.inference_mode():
        return compiled(**kw).sample, unet(**kw).sample


@pytest.mark.parametrize("preset,lora", [("tiny-sdxl-turbo", False), ("tiny-sdxl", True)])
def test_vq_unet_compiles_whole_and_equals_eager(vq_unet, preset, lora):
    rt = LoraRuntime(types.SimpleNamespace(unet=vq_unet))
    try:
        if lora:  # every VQ layer and one dense layer (conv_in) adapted
            targets = {**dict(vq_modules(vq_unet)), "conv_in": vq_unet.conv_in}
            rt.add(random_adapter("style", targets, rank=4, seed=1))
        with rt.activate([("style", 0.8)] if lora else []):
            y, eager = compiled_and_eager(vq_unet, unet_inputs(preset), "aot_eager")
            if lora:
                with torch.inference_mode():
                    assert rel(eager, vq_unet(**unet_inputs(preset)).sample) < 1  # the branch is really there
    finally:
        rt.close()
    assert rel(y, eager) < REL_TOL


def test_vq_unet_with_frozen_budget_cache_compiles_whole(vq_unet):
    kw = unet_inputs("tiny-sdxl-turbo")
    sizes = sorted(m.n * m.d * 4 for _, m in vq_modules(vq_unet))
    cache = install_weight_cache(vq_unet, f"budget={sum(sizes[: len(sizes) // 2])}")  # about half the layers
    try:
        assert "freeze" in compile_blocker(vq_unet)
        with torch.inference_mode():
            vq_unet(**kw)  # the eager warm-up step fills the resident set
        cache.freeze()
        assert compile_blocker(vq_unet) is None
        resident = cache.stats()["entries"]
        assert 0 < resident < len(sizes)  # cached and decoding layers both in the graph
        y, eager = compiled_and_eager(vq_unet, kw, "eager")
        assert cache.stats()["entries"] == resident
    finally:
        install_weight_cache(vq_unet, "none")
    assert rel(y, eager) < REL_TOL


@pytest.mark.parametrize("policy,reason", [("request", "decodes and frees weights per request"),
                                           ("budget=1GB", "call cache.freeze()")])
def test_host_logic_cache_policies_are_a_clear_error(vq_unet, policy, reason):
    install_weight_cache(vq_unet, policy)
    try:
        assert reason in compile_blocker(vq_unet)
        torch._dynamo.reset()
        with pytest.raises(Exception, match="NotCompilableError") as err, torch.inference_mode():
            torch.compile(vq_unet, backend="eager", fullgraph=True)(**unet_inputs("tiny-sdxl-turbo"))
        assert reason in str(err.value)
    finally:
        install_weight_cache(vq_unet, "none")


# -- a small VQ block: recompiles and one inductor run --------------------------------------------------
class VQBlock(nn.Module):
    """A VQ conv and a VQ linear, shaped like a U-Net resnet feeding an attention projection."""

    def __init__(self, quantizer) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = make_vq_module(nn.Conv2d(8, 16, 3, padding=1), 2)
        self.proj = make_vq_module(nn.Linear(16, 24), 2)
        for m in (self.conv, self.proj):
            m.set_quantized(*quantizer(2)("", torch.randn(m.n, m.d)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.conv(x)).flatten(2).transpose(1, 2))


@pytest.fixture
def block(simple_quantizer):
    b = VQBlock(simple_quantizer)
    rt = LoraRuntime(types.SimpleNamespace(unet=b))
    targets = {"conv": b.conv, "proj": b.proj}
    rt.add(random_adapter("a", targets, rank=4, seed=1))
    rt.add(random_adapter("b", targets, rank=8, seed=2))
    yield b, rt
    rt.close()


def test_recompiles_on_lora_and_cache_changes(block):
    """What compiled serving can count on: the steps that recompile, and those that reuse a graph."""
    b, rt = block
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(b, backend=counter, fullgraph=True)
    x = torch.randn(2, 8, 6, 6)
    steps = [  # (what changes, LoRA set, graphs compiled so far)
        ("no LoRA", [], 1),
        ("an adapter set activates", [("a", 0.8)], 2),
        ("same set, other scale", [("a", -0.3)], 2),
        ("another rank", [("b", 1.0)], 3),  # the rank is marked dynamic from here on
        ("a third rank", [("a", 1.0), ("b", 0.5)], 3),
        ("back to no LoRA", [], 3),
    ]
    for what, choice, graphs in steps:
        with rt.activate(choice), torch.inference_mode():
            assert rel(compiled(x), b(x)) < REL_TOL, what
        assert counter.frame_count == graphs, what
    cache = install_weight_cache(b, "budget=1GB")
    with torch.inference_mode():
        b(x)
    cache.freeze()
    for what, graphs in (("a frozen cache installed", 4), ("the same cache again", 4)):
        with torch.inference_mode():
            assert rel(compiled(x), b(x)) < REL_TOL, what
        assert counter.frame_count == graphs, what
    cache.clear()  # thaws
    with torch.inference_mode():
        b(x)
    cache.freeze()  # the same layers resident, new tensors: graph inputs, no recompile
    with torch.inference_mode():
        assert rel(compiled(x), b(x)) < REL_TOL
    assert counter.frame_count == 4


def test_inductor_matches_eager_with_lora_and_frozen_cache(block):
    b, rt = block
    cache = install_weight_cache(b, f"budget={b.proj.n * b.proj.d * 4}")  # proj cached, conv decodes in-graph
    x = torch.randn(2, 8, 6, 6)
    with torch.inference_mode():
        b(x)
    cache.freeze()
    assert cache.stats()["entries"] == 1
    torch._dynamo.reset()
    compiled = torch.compile(b, backend="inductor", fullgraph=True)
    # compile_threads=1: no pool of compile workers on the 2-core box (and none to tear down at exit)
    with rt.activate([("a", 0.8)]), torch.inference_mode(), torch._inductor.config.patch(compile_threads=1):
        assert rel(compiled(x), b(x)) < REL_TOL
