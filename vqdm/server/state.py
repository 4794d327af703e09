"""What a running server holds, created in the lifespan and reached through `app.state.vqdm`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from vqdm.server.batching import Dispatcher
from vqdm.server.image_store import ImageStore
from vqdm.server.metrics import Metrics
from vqdm.server.settings import Settings

if TYPE_CHECKING:
    from vqdm.server.loader import ServedModel


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    dispatcher: Dispatcher
    devices: list[str]
    models: dict[str, "ServedModel"] = field(default_factory=dict)
    ready: bool = False
    phase: str = "starting"  # starting → loading models → warming up → ready | failed | shutting down
    load_error: str | None = None
    draining: bool = False  # SIGTERM received: /readyz 503, new requests 503 (server.drain)
    started: float = field(default_factory=time.time)
    # Uploads decoding at once (each holds a full-size image while it runs); made in the lifespan,
    # inside the loop that awaits it.
    decode_limiter: anyio.CapacityLimiter | None = None
    image_store: ImageStore | None = None  # the images url replies link to
    # The model each API key (None: everyone, when no keys are set) chose with AUTOMATIC1111's POST
    # /sdapi/v1/options; its txt2img / img2img without an override use it (vqdm.server.a1111).
    a1111_checkpoints: dict[int | None, str] = field(default_factory=dict)
