"""Event-loop lag: how late the loop runs a timer, measured inside the server.

Everything the server answers waits its turn on one event-loop thread. Work that holds that
thread (an upload decoded on it, a long synchronous call, the GIL held by a worker thread, the
process not scheduled by the OS) delays every handler by the same amount, /healthz included. A
timer due `interval_s` from now that fires late by d seconds saw exactly such a stall of d, so its
lateness is the loop's own figure, free of a client's scheduling and the network: the soak
benchmark (benchmarks/soak.py) reads it from `vqdm_event_loop_lag_seconds`.
"""
from __future__ import annotations

import asyncio
from typing import Callable

LAG_INTERVAL_S = 0.1  # often enough that a stall longer than this cannot hide, cheap enough to ignore


async def watch_loop_lag(observe: Callable[[float], None], interval_s: float = LAG_INTERVAL_S) -> None:
    """Forever: sleep `interval_s` and `observe` how many seconds later than due the loop woke up."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - due))
