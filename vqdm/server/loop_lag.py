"""Event-loop lag: how late the loop runs a metronome of timers, measured inside the server.

Everything the server answers waits its turn on one event-loop thread. Work that holds that
thread (an upload decoded on it, a long synchronous call, the GIL held by a worker thread, the
process not scheduled by the OS) delays every handler by the same amount, /healthz included. A
tick due at t that runs at t + d saw the loop held for d, so its lateness is the loop's own figure,
free of a client's scheduling and the network: the soak benchmark (benchmarks/soak.py) reads it
from `vqdm_event_loop_lag_seconds`.

The ticks are due on a fixed schedule (t0 + k * interval), not `interval` after the last wake-up:
a stall of 1 s is ten late ticks (1.0, 0.9, ... 0.1 s late), as ten requests arriving during it
would wait, not one. Otherwise the histogram would count a long stall once and its percentiles
would hide it (the "coordinated omission" of a sampler that waits for the thing it measures).
"""
from __future__ import annotations

import asyncio
from typing import Callable

LAG_INTERVAL_S = 0.1  # often enough that a stall longer than this cannot hide, cheap enough to ignore


async def watch_loop_lag(observe: Callable[[float], None], interval_s: float = LAG_INTERVAL_S) -> None:
    """Forever: `observe` how many seconds after it was due the loop ran each tick of the schedule."""
    loop = asyncio.get_running_loop()
    due = loop.time() + interval_s
    while True:
        await asyncio.sleep(max(0.0, due - loop.time()))
        now = loop.time()
        while due <= now:  # every tick due by now, each as late as it is
            observe(now - due)
            due += interval_s
