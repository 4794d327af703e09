"""Server configuration: one pydantic-settings model read from `VQDM_*` environment variables,
with `vqdm serve` flags layered on top (flags win).

List settings take comma-separated values in the environment, the form a ConfigMap or a
Kubernetes secret holds naturally:
    VQDM_MODELS="sdxl-vq3=/models/sdxl-vq3,turbo-vq2=/models/turbo-vq2"
    VQDM_API_KEYS="key-one,key-two"
"""
from __future__ import annotations


import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from vqdm.errors import ConfigError
from vqdm.models.single_file import SingleFileOptions
from vqdm.models.weight_cache import CachePolicy, parse_bytes
from vqdm.server.compiled import parse_bucket

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
EMBEDDED_MODEL_ID = "vqdm-tiny-sdxl"


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: its public id and where it comes from (a folder or single-file checkpoint, or the
    embedded default)."""

    id: str
    path: Path | None  # None: the embedded default (its prebuilt artifact, shipped in the package)
    single_file: SingleFileOptions | None = None  # what a single file cannot say (`generate --family/--vae/--config`)


def parse_model_spec(text: str) -> ModelSpec:
    """'NAME=PATH' or 'PATH' (the id is then the folder's name)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).name, text
    name, path = name.strip(), path.strip()
    if not path:
        raise ValueError(f"model {text!r}: empty path; write NAME=PATH, e.g. sdxl-vq3=/models/sdxl-vq3")
    if not MODEL_ID_RE.match(name):
        raise ValueError(f"model id {name!r}: use 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit)")
    return ModelSpec(name, Path(path).expanduser())


def parse_alias(text: str) -> tuple[str, str]:
    """'ALIAS=MODEL' -> (alias, model id)."""
    alias, sep, target = (part.strip() for part in text.partition("="))
    if not sep or not alias or not target:
        raise ValueError(f"model alias {text!r}: write ALIAS=MODEL, e.g. dall-e-3=sdxl-vq3")
    if not MODEL_ID_RE.match(alias):
        raise ValueError(f"model alias {alias!r}: use 1-64 letters, digits, '.', '_' or '-' (starting with a letter "
                         "or digit)")
    return alias, target


def _split_commas(value):
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class Settings(BaseSettings):
    """Everything `vqdm serve` can be told. Field names map to `VQDM_<NAME>` variables."""

    model_config = SettingsConfigDict(env_prefix="VQDM_", extra="ignore", validate_default=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="NAME=PATH entries; none serves the embedded default")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="bearer keys; none leaves the API open", repr=False)
    protect_metrics: bool = Field(False, description="require an API key on /metrics too")
    # What a single-file checkpoint among `models` cannot say about itself (as generate's --family,
    # --vae, --config); applied to every model given as a dense .safetensors file.
    single_file_family: Literal["sdxl", "sdxl-turbo"] | None = Field(
        None, description="family of single-file checkpoints whose metadata does not say: sdxl or sdxl-turbo")
    single_file_vae: str | None = Field(
        None, description="VAE file or folder for single-file checkpoints without one baked in")
    single_file_config: str | None = Field(
        None, description="architecture preset of single-file checkpoints (default: the one their shapes match)")
    # Model names and sizes (vqdm.server.sizes; docs/server.md "Model names and sizes"): the names
    # clients send by default (dall-e-3) and what a request for a size a model was not trained at gets.
    model_aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="ALIAS=MODEL entries: a name a client may send (dall-e-3) for a served "
                                          "model id; /v1/models lists each alias with alias_of")
    route_unknown_models: bool = Field(
        False, description="a request naming no served model nor alias runs on the first model (the reply's model "
                           "field names it); off: 400 listing the models and aliases")
    size_policy: Literal["auto", "nearest", "refuse", "any"] = Field(
        "auto", description="a request for a size the model was not trained at: nearest = generate at the nearest "
                            "trained size and resize (the reply's generated_size says so); refuse = 400 listing the "
                            "sizes; any = generate as asked; auto = nearest for the embedded demo, any otherwise")

    # Admission and batching.
    max_queue_size: int = Field(32, ge=1, description="jobs waiting (not running); beyond it: 429")
    max_queued_edit_pixels: int = Field(
        16 * 2048 * 2048, ge=64 * 64,
        description="input pixels (width * height at the output size, plus the full-size source of A1111's "
                    "'only masked') the waiting edits may hold together, 4 bytes each (Pillow's RGB), 5 with a "
                    "mask; beyond it: 429. At least max_pixels")
    max_batch_size: int = Field(4, ge=1, description="images per pipeline call")
    batch_wait_ms: float = Field(0.0, ge=0, description="wait this long for batch mates when idle")
    request_timeout_s: float = Field(600.0, gt=0, description="queue + run; beyond it: 504 and the job is cancelled")
    shutdown_timeout_s: float = Field(
        300.0, ge=0, description="drain: SIGTERM to exit is at most this plus a few seconds (server.drain); "
                                 "jobs unfinished by then get 503; 0 answers them at once")
    job_retention_s: float = Field(600.0, ge=0, description="finished jobs stay visible at /v1/requests/{id}")

    # Input limits.
    max_n: int = Field(4, ge=1, le=128, description="images per request; at most max_batch_size (a job is never split)")
    max_steps: int = Field(150, ge=1)
    max_side: int = Field(2048, ge=64, description="pixels, either side")
    min_side: int = Field(64, ge=8)
    max_pixels: int = Field(2048 * 2048, ge=64 * 64, description="width * height")
    max_prompt_chars: int = Field(4000, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_guidance: float = Field(30.0, ge=0)
    max_image_bytes: int = Field(16 << 20, ge=1024, description="each file uploaded to /v1/images/edits")
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64, description="width * height of an uploaded image")
    edit_decode_concurrency: int = Field(
        2, ge=1, description="uploads decoded at once, in worker threads off the event loop; each holds one "
                             "full-size image (4 bytes a pixel) while it decodes")

    # Image files (response_format url): vqdm.server.image_store, docs/clients/openai.md "URLs".
    image_store_dir: str | None = Field(
        None, description="folder for the images that url replies link to; set the same shared folder (a network "
                          "volume) on every replica so that a URL works through any of them; none: a private "
                          "temporary folder, removed at shutdown")
    image_store_max_bytes: int = Field(
        1 << 30, ge=1 << 20, description="bytes of image files kept (in the whole folder, when shared); beyond it "
                                         "the oldest are removed, so their URLs answer 404")
    image_store_ttl_s: float = Field(
        3600.0, gt=0, description="a URL answers 404 this long after its image was stored (OpenAI's last an hour)")
    public_url: str | None = Field(
        None, description="base URL clients reach this server at, e.g. https://images.example.com behind a proxy; "
                          "url replies link under it; none: the base URL of the request being answered")

    # Observability.
    metrics_port: int | None = Field(None, ge=0, le=65535, description="also serve /metrics on this port")
    metrics_host: str | None = Field(None, description="address for metrics_port (default: host)")
    json_logs: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Execution.
    devices: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["auto"], description="one worker per device; 'auto' = cuda:0 if present else cpu")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    backend: str = Field("auto", description="kernel backend for VQ layers (vqdm.kernels)")
    weight_cache: str = Field("none", description="none | request | budget=BYTES (vqdm.models.weight_cache)")
    verify_artifacts: bool = Field(
        True, description="check the sha256 of every artifact file at start-up (seconds per GB); off skips only "
                          "the hashes: paths, links and unlisted files are always checked")
    warmup: bool = True
    warmup_steps: int = Field(1, ge=1)
    warmup_size: Literal["auto", "max", "default"] = Field(
        "auto", description="max: warm up the worst case (max_batch_size images at the largest size the limits "
                            "admit); default: one image at the model's size; auto: max on GPUs, default on CPU")
    compile: Literal["off", "auto", "default", "max-autotune", "reduce-overhead"] = Field(
        "off", description="compiled serving (vqdm.server.compiled): torch.compile each U-Net at start-up, inside "
                           "warm-up, for the compile_shapes, in this torch.compile mode; reduce-overhead and "
                           "max-autotune replay CUDA graphs on GPUs; other shapes run eagerly; auto: only where "
                           "compiling measured faster (compiled.AUTO_MODE: on CPU, fp32 shapes from SDXL's 1024² "
                           "with guidance up; on GPUs, every shape with CUDA graphs)")
    compile_shapes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="ROWSxWIDTHxHEIGHT shapes to compile, rows as they reach the U-Net (images, doubled under "
                    "guidance), e.g. 2x1024x1024; none: each model's size at 1..max_batch_size images with the "
                    "rows its default guidance sends")
    compile_backend: str = Field(
        "inductor", description="torch.compile backend for compiled serving; aot_eager traces the same graph "
                                "without generating code (start-up in seconds, no speed-up: for tests)")
    stall_timeout_s: float = Field(
        300.0, ge=0, description="a running batch with no forward pass for this long marks the server unhealthy "
                                 "(/healthz 503, restart); 0 turns the watchdog off")
    cpu_threads: int | None = Field(
        None, ge=1, description="torch threads; unset: from the cgroup CPU quota and affinity (server.threads)")

    # Replicas (docs/deploy.md): job ids name the replica that runs them; status and cancel are
    # forwarded to it.
    advertise_url: str | None = Field(None, description="this replica's address as its peers reach it")
    peers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="peer base URLs, or dns:HOST:PORT (every address HOST resolves to)")
    peer_timeout_s: float = Field(
        2.0, gt=0, description="peers are asked at once about a job not found here; one that has not answered "
                               "within this is skipped")

    # LoRA adapters (vqdm.server.loras).
    loras: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="NAME=PATH (.safetensors) or a folder of them, loaded at start-up")
    lora_memory_budget: str = Field(
        "1GB", description="bytes of LoRA adapters per model and device, e.g. 1GB, 512MiB: each at rest (fp16) plus "
                           "the branch set a request builds and caches, in compute dtype (vqdm.server.loras)")

    # The embedded default (served when no model is given): the K and seed its prebuilt artifact was
    # made with; another pair is refused with the command that makes it (vqdm.server.embedded).
    embedded_seed: int = 0
    embedded_codebooks: int = Field(2, ge=1, le=8)

    @field_validator("models", "api_keys", "devices", "peers", "loras", "compile_shapes", "model_aliases",
                     mode="before")
    @classmethod
    def _lists(cls, value):
        return _split_commas(value)

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: list[str]) -> list[str]:
        ids = [parse_model_spec(v).id for v in value]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"model id(s) given twice: {', '.join(dup)}")
        return value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"public_url {value!r} must start with http:// or https://")
        return value.rstrip("/") if value else value

    @field_validator("model_aliases")
    @classmethod
    def _check_aliases(cls, value: list[str], info: ValidationInfo) -> list[str]:
        ids = [parse_model_spec(m).id for m in info.data.get("models", [])] or [EMBEDDED_MODEL_ID]
        aliases = [parse_alias(v) for v in value]
        names = [a for a, _ in aliases]
        for alias, target in aliases:
            if names.count(alias) > 1:
                raise ValueError(f"alias {alias!r} given twice")
            if alias in ids:
                raise ValueError(f"alias {alias!r} is already a served model's id; pick another name")
            if target not in ids:
                raise ValueError(f"alias {alias!r} names model {target!r}, which is not served here "
                                 f"(served: {', '.join(ids)})")
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: list[str]) -> list[str]:
        if any(len(k) < 8 for k in value):
            raise ValueError("API keys must be at least 8 characters")
        return value

    @field_validator("weight_cache")
    @classmethod
    def _check_cache(cls, value: str) -> str:
        CachePolicy.parse(value)  # raises with a message naming the accepted forms
        return value

    @field_validator("compile_shapes")
    @classmethod
    def _check_compile_shapes(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_bucket(text)
        return value

    @field_validator("lora_memory_budget")
    @classmethod
    def _check_lora_budget(cls, value: str) -> str:
        parse_bytes(value)
        return value

    @model_validator(mode="after")
    def _check_sides(self) -> "Settings":
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} exceeds max_side {self.max_side}")
        if len(set(self.devices)) != len(self.devices) or not self.devices:
            raise ValueError(f"devices must be distinct and non-empty (got {self.devices})")
        if self.max_n > self.max_batch_size:
            # A job is never split across batches, so n above the batch size would slip past it.
            if "max_n" in self.model_fields_set:
                raise ValueError(f"max_n {self.max_n} exceeds max_batch_size {self.max_batch_size}: a request's "
                                 "images run in one batch; raise max_batch_size or lower max_n")
            self.max_n = self.max_batch_size
        if self.max_queued_edit_pixels < self.max_pixels:
            # Below it, one edit of the largest size could never be admitted.
            if "max_queued_edit_pixels" in self.model_fields_set:
                raise ValueError(f"max_queued_edit_pixels {self.max_queued_edit_pixels} is below max_pixels "
                                 f"{self.max_pixels}: an edit of the largest size could never wait in the queue; "
                                 "raise max_queued_edit_pixels or lower max_pixels")
            self.max_queued_edit_pixels = self.max_pixels
        return self

    def aliases(self) -> dict[str, str]:
        """alias -> served model id, from `model_aliases` (checked at start-up: every target is served)."""
        return dict(parse_alias(v) for v in self.model_aliases)

    def model_specs(self) -> list[ModelSpec]:
        if not self.models:
            return [ModelSpec(EMBEDDED_MODEL_ID, None)]
        specs = [parse_model_spec(m) for m in self.models]
        options = SingleFileOptions(self.single_file_family, self.single_file_vae, self.single_file_config)
        if options == SingleFileOptions():
            return specs
        return [replace(m, single_file=options) if m.path.is_file() else m for m in specs]


def settings_from(overrides: dict) -> Settings:
    """Settings from VQDM_* variables with `overrides` (flags) on top; a bad value is a one-line error."""
    try:
        return Settings(**overrides)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(f"{where}: {first['msg']}") from None
