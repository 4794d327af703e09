"""Graceful shutdown bounded by one setting, `shutdown_timeout_s` (the drain timeout).

On the first SIGTERM (or SIGINT) the server keeps listening but drains: /readyz answers 503 at
once, new generation requests get 503 `server_shutting_down` with Retry-After, queued and running
jobs get up to the drain timeout to finish, and whatever is left then is answered 503 too. Only
then does uvicorn's own shutdown start; it waits at most `FLUSH_S` for those last replies to be
written. So SIGTERM to exit takes at most `shutdown_timeout_s + FLUSH_S` (plus the lifespan's
teardown, which waits for nothing), and the orchestrator's grace period is derived from it
(`grace_period_s`; deploy/ is tested against it). A second signal exits at once.
"""
from __future__ import annotations

import asyncio
import logging
import math
import signal
from typing import Callable

import uvicorn

log = logging.getLogger("vqdm.server")

FLUSH_S = 5  # after the drain: uvicorn's wait for the last replies to be written
MARGIN_S = 10  # process exit, a slow log flush, a kubelet that is late to act


def grace_period_s(shutdown_timeout_s: float, pre_stop_s: float = 0.0) -> int:
    """Seconds an orchestrator must allow from its SIGTERM (or preStop) to SIGKILL."""
    return math.ceil(pre_stop_s + shutdown_timeout_s + FLUSH_S + MARGIN_S)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the app (`drain()`) before uvicorn shuts down."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], "asyncio.Future | None"]) -> None:
        super().__init__(config)
        self._drain = drain  # () -> awaitable that returns when the app has drained
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining or self.should_exit or self._loop is None:
            self.force_exit = self._draining  # a second signal: stop now
            return super().handle_exit(sig, frame)
        self._draining = True
        self._captured_signals.append(sig)  # re-raised after shutdown: the conventional exit status
        log.info("received %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain_then_exit()))

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        except Exception:  # noqa: BLE001 - shut down regardless
            log.exception("drain failed; shutting down anyway")
        finally:
            self.should_exit = True
