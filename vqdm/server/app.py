"""The FastAPI application: `create_app(settings)` builds it; everything stateful (metrics, queue,
workers, models) is created in the lifespan and hung on `app.state.vqdm`, never at import.

Start-up does not block the server: the lifespan starts model loading in the background and
returns, so /healthz answers at once and /readyz says 503 until every model is loaded and warmed
up. Shutdown: `vqdm serve` drains on SIGTERM before uvicorn stops (server.drain); the lifespan's
teardown drains too (for servers started otherwise), then stops the workers.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable

import anyio
from fastapi import FastAPI

from vqdm import __version__
from vqdm.server.a1111 import IMG2IMG_PATH
from vqdm.server.a1111 import router as a1111_router
from vqdm.server.batching import Dispatcher
from vqdm.server.edits import EDITS_PATH
from vqdm.server.edits import router as edits_router
from vqdm.server.errors import install_error_handlers
from vqdm.server.image_store import ImageStore
from vqdm.server.loader import ModelLoader, load_models, resolve_device
from vqdm.server.loop_lag import watch_loop_lag
from vqdm.server.loras import attach_loras
from vqdm.server.metrics import Metrics
from vqdm.server.metrics_port import start_metrics_server
from vqdm.server.middleware import BodyLimitMiddleware, RequestContextMiddleware
from vqdm.server.replicas import Peers
from vqdm.server.routes import router
from vqdm.server.schemas import ErrorResponse
from vqdm.server.settings import Settings
from vqdm.server.state import ServerState
from vqdm.server.warmup import warm_up

log = logging.getLogger("vqdm.server")


async def _load_and_warm(state: ServerState, loader: ModelLoader, on_fatal: Callable[[str], None] | None) -> None:
    try:
        state.phase = "loading models"
        models = await asyncio.to_thread(loader, state.settings, state.devices)
        await asyncio.to_thread(attach_loras, models, state.settings)
        state.models = {m.id: m for m in models}
        state.dispatcher.install(state.models)
        for m in models:
            state.metrics.set_model(m.id, m.weight_bytes)
        if state.settings.warmup or state.settings.compile != "off":
            state.phase = "warming up"
            await warm_up(state.dispatcher, state.settings.warmup_steps)
        state.dispatcher.start()
        state.ready, state.phase = True, "ready"
        state.metrics.ready.set(1)
        log.info("ready: serving %s on %s", ", ".join(state.models), ", ".join(state.devices))
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - reported on /healthz and /readyz, and to the CLI
        log.exception("start-up failed")
        state.load_error, state.phase = f"{type(e).__name__}: {e}", "failed"
        if on_fatal is not None:
            on_fatal(state.load_error)


async def drain(state: ServerState | None) -> None:
    """SIGTERM: not ready from now on, refuse new jobs, finish or answer the rest within the drain
    timeout. Safe to call twice."""
    if state is None:
        return
    state.draining, state.ready = True, False
    state.metrics.ready.set(0)
    await state.dispatcher.drain(state.settings.shutdown_timeout_s)


def create_app(settings: Settings | None = None, loader: ModelLoader | None = None,
               on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """`loader(settings, devices) -> [ServedModel]` defaults to `loader.load_models`; `on_fatal`
    is called with the error when start-up fails (the CLI uses it to stop uvicorn)."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        devices = [resolve_device(d) for d in settings.devices]
        metrics = Metrics()
        metrics.build_info.labels(__version__, settings.backend, ",".join(devices)).set(1)
        state = ServerState(settings=settings, metrics=metrics, dispatcher=Dispatcher(settings, metrics, devices),
                            devices=devices, decode_limiter=anyio.CapacityLimiter(settings.edit_decode_concurrency))
        state.image_store = await asyncio.to_thread(
            ImageStore, settings.image_store_dir, settings.image_store_max_bytes, settings.image_store_ttl_s, metrics)
        if settings.peers and settings.image_store_dir is None:
            log.warning("peers are set but image_store_dir is not: an image URL works only through the replica "
                        "that made it (docs/deploy.md, Replicas)")
        app.state.vqdm = state
        metrics_server = None
        if settings.metrics_port is not None:
            metrics_server = start_metrics_server(settings.metrics_host or settings.host, settings.metrics_port,
                                                  metrics.registry,
                                                  settings.api_keys if settings.protect_metrics else [])
        loading = asyncio.create_task(_load_and_warm(state, loader or load_models, on_fatal))
        lag = asyncio.create_task(watch_loop_lag(metrics.loop_lag.observe), name="vqdm-loop-lag")
        try:
            yield
        finally:
            lag.cancel()
            state.ready, state.phase = False, "shutting down"
            metrics.ready.set(0)
            if not loading.done():
                loading.cancel()
            await state.dispatcher.shutdown(settings.shutdown_timeout_s)
            await asyncio.to_thread(state.image_store.close)
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            log.info("shut down")

    # Every error is OpenAI's shape (server.errors), never FastAPI's default 422 body: say so in the schema.
    errors = {"model": ErrorResponse, "description": "an error, in OpenAI's shape"}
    app = FastAPI(title="vqdm", version=__version__, lifespan=lifespan, responses={"4XX": errors, "5XX": errors},
                  description="Text-to-image with VQ-compressed SDXL U-Nets; OpenAI-compatible Images API and "
                              "AUTOMATIC1111's /sdapi/v1 API.")
    app.state.settings = settings
    app.state.peers = peers = Peers(settings.advertise_url, settings.peers, settings.peer_timeout_s)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(edits_router)
    app.include_router(a1111_router)
    # An edit carries an image and a mask: its body may hold both files plus the form fields (in
    # A1111's img2img, both as base64 in JSON: 4 bytes for every 3).
    edit_body = 2 * settings.max_image_bytes + settings.max_body_bytes
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       path_limits={EDITS_PATH: edit_body, IMG2IMG_PATH: edit_body * 4 // 3 + 16})
    app.add_middleware(RequestContextMiddleware,
                       metrics_getter=lambda: getattr(getattr(app.state, "vqdm", None), "metrics", None),
                       new_id=peers.new_job_id)
    return app
