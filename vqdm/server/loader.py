"""The models a server holds: one `ServedModel` per public id, one `Replica` of it per device.

A replica is a pipeline placed on its device and prepared for serving: kernel backend chosen,
weight-cache policy installed, fp16 VAEs that need fp32 kept in fp32 once (rather than cast back
and forth on every request as diffusers does), the base scheduler config remembered so each batch
can build the sampler it asks for.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from vqdm.models import (Preset, detect_family, layer_bits, load_pipeline, resident_weight_bytes, set_backend,
                         vq_modules)
from vqdm.models.weight_cache import install_weight_cache
from vqdm.server import embedded, sizes
from vqdm.server.settings import ModelSpec, Settings

log = logging.getLogger("vqdm.server")

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return str(dev) if dev.type != "cuda" or dev.index is not None else "cuda:0"


def resolve_dtype(name: str, device: str):
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, _DTYPES[name])


@dataclass
class Replica:
    pipe: Any  # diffusers StableDiffusionXLPipeline
    device: Any  # torch.device
    scheduler_class: str
    scheduler_config: dict
    weight_cache: Any = None  # vqdm.models.weight_cache.WeightCache or None
    loras: Any = None  # vqdm.models.lora.LoraRuntime, set by vqdm.server.loras.attach_loras
    compiled: Any = None  # vqdm.server.compiled.CompiledUNet, set at warm-up when compiled serving is on
    latent_preview: Any = None  # vqdm.models.preview.LatentPreview, fitted at the first request for partial images


@dataclass
class ServedModel:
    id: str
    source: str  # a folder, or "embedded"
    family: str  # "sdxl" | "sdxl-turbo"
    default_steps: int
    default_guidance: float
    default_width: int
    default_height: int
    quantization: dict | None  # None: a dense model
    weight_bytes: dict[str, int]  # stored / dense_fp16 / dense_fp32
    replicas: dict[str, Replica] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    load_seconds: float = 0.0
    loras: dict[str, dict] = field(default_factory=dict)  # name -> card of each LoRA attached to it
    # The (width, height) sizes it was trained at, and what a request for another size gets (vqdm.server.sizes).
    trained_sizes: tuple[tuple[int, int], ...] = ()  # empty: its default size alone
    size_policy: str = "any"  # nearest | refuse | any

    def __post_init__(self) -> None:
        self.trained_sizes = self.trained_sizes or ((self.default_width, self.default_height),)

    def card(self, detail: bool = False) -> dict[str, Any]:
        """An OpenAI model object plus what vqdm knows about it (GET /v1/models[/{id}]); no file paths
        (clients cannot use them, and they tell how the host is laid out): the start-up log has them."""
        out: dict[str, Any] = {
            "id": self.id, "object": "model", "created": self.created, "owned_by": "vqdm",
            "family": self.family,
            "quantization": self.quantization,
            "weight_bytes": self.weight_bytes,
            "compression_vs_fp16": round(self.weight_bytes["dense_fp16"] / max(self.weight_bytes["stored"], 1), 4),
            "defaults": {"size": f"{self.default_width}x{self.default_height}", "num_inference_steps": self.default_steps,
                         "guidance_scale": self.default_guidance},
            "loras": list(self.loras.values()),
            "trained_sizes": sizes.size_names(self.trained_sizes), "size_policy": self.size_policy,
        }
        if detail:
            out.update(devices=list(self.replicas), load_seconds=round(self.load_seconds, 3))
        return out


def quantization_summary(unet, manifest: dict | None = None, extra: dict | None = None) -> dict | None:
    """K/B/g and bits per weight of the VQ layers actually loaded (None for a dense U-Net)."""
    layers = vq_modules(unet)
    if not layers:
        return None
    first = layers[0][1]
    q_weights = sum(m.n * m.d for _, m in layers)
    q_bits = sum(layer_bits(m.n, m.d, m.num_codebooks, m.nbits, m.group_size) * m.n * m.d for _, m in layers)
    dense_params = sum(p.numel() for p in unet.parameters()) - sum(
        m.codebooks.numel() + m.scales.numel() for _, m in layers)
    out: dict[str, Any] = {
        "method": "aq", "num_codebooks": first.num_codebooks, "nbits": first.nbits, "group_size": first.group_size,
        "layers": len(layers),
        "bits_per_weight_quantized": round(q_bits / q_weights, 4),
        "bits_per_weight_unet": round((q_bits + 16 * dense_params) / (q_weights + dense_params), 4),
    }
    if manifest is not None:
        q = manifest.get("quantization", {})
        out["method"] = q.get("method", "aq")
        if "subsets" in q:  # a partly quantized artifact (`vqdm quantize --subsets`): the others are dense
            out["subsets"] = q["subsets"]
        for key in ("base_model", "calibration", "distillation"):
            if manifest.get(key) is not None:
                out[key] = manifest[key]
    if extra:
        out.update(extra)
    return out


def prepare_replica(pipe, device: str, settings: Settings) -> Replica:
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if pipe.vae.dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16; keep it fp32 once and for all
    # The VAE decodes one image at a time, in tiles above its native size, so that the decode of a
    # big batch is never what runs out of memory (the U-Net's activations bound the batch instead).
    pipe.vae.enable_slicing()
    pipe.vae.enable_tiling()
    cache = None
    if vq_modules(pipe.unet):
        set_backend(pipe.unet, settings.backend)
        cache = install_weight_cache(pipe.unet, settings.weight_cache)
    # The base config without diffusers' private keys: each batch builds its sampler from it (runner).
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    return Replica(pipe=pipe, device=torch.device(device), scheduler_class=type(pipe.scheduler).__name__,
                   scheduler_config=config, weight_cache=cache)


def _family_defaults(family: str) -> tuple[int, float]:
    p = Preset.from_name(family)
    return p.steps, p.guidance


def _quiet_loading_bars() -> None:
    """diffusers/transformers draw progress bars while loading; in server logs they are noise."""
    # Deferred: diffusers and transformers take seconds to import; they load in the loading thread
    # while /healthz already answers, not when the app is built.
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_model(spec: ModelSpec, settings: Settings, devices: list[str]) -> ServedModel:
    """Load one model onto every device: an artifact or diffusers folder, or the embedded default's
    prebuilt artifact (through the same loader, hashes checked unless `verify_artifacts` is off)."""
    _quiet_loading_bars()
    t0 = time.perf_counter()
    if spec.path is None:
        path, preset = embedded.embedded_artifact(settings.embedded_seed, settings.embedded_codebooks)
        family, steps, guidance, source = preset.family, preset.steps, preset.guidance, "embedded"
    else:
        path, family, source = spec.path, detect_family(spec.path, spec.single_file), str(spec.path)
        steps, guidance = _family_defaults(family)
    # An artifact's files are hashed once, for the first device; the others load the same files.
    pipes = {dev: load_pipeline(path, dtype=resolve_dtype(settings.dtype, dev), device=dev,
                                verify=settings.verify_artifacts and i == 0, single_file=spec.single_file)
             for i, dev in enumerate(devices)}
    manifest = getattr(next(iter(pipes.values())), "vqdm_manifest", None)
    quant_extra = embedded.quantization_facts(manifest) if spec.path is None else None
    replicas = {dev: prepare_replica(p, dev, settings) for dev, p in pipes.items()}
    pipe = next(iter(replicas.values())).pipe
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    model = ServedModel(
        id=spec.id, source=source, family=family, default_steps=steps, default_guidance=guidance,
        default_width=side, default_height=side,
        # The embedded default's side is its preset's resolution (32; tests/server/test_embedded.py).
        trained_sizes=sizes.trained_sizes(family, (side, side)),
        size_policy=sizes.effective_policy(settings.size_policy, source),
        quantization=quantization_summary(pipe.unet, manifest, quant_extra),
        weight_bytes=resident_weight_bytes(pipe.unet), replicas=replicas,
    )
    model.load_seconds = time.perf_counter() - t0
    return model


ModelLoader = Callable[[Settings, list[str]], list[ServedModel]]


def load_models(settings: Settings, devices: list[str]) -> list[ServedModel]:
    """Every configured model (or the embedded default), in the order given; first is the default."""
    models = []
    for spec in settings.model_specs():
        log.info("loading model %s from %s onto %s", spec.id, spec.path or "the embedded default", ", ".join(devices))
        m = load_model(spec, settings, devices)
        q = m.quantization
        log.info("model %s ready in %.1fs: %s, %s, %.1f MB stored vs %.1f MB dense fp16", m.id, m.load_seconds,
                 m.family, f"{q['bits_per_weight_quantized']:.2f} bits/weight on {q['layers']} VQ layers" if q else "dense",
                 m.weight_bytes["stored"] / 1e6, m.weight_bytes["dense_fp16"] / 1e6)
        models.append(m)
    return models
