"""A U-Net's forward compiled whole with torch.compile, for static shapes.

The forward is compiled, not the module: calling the result runs no module-level hooks (the
server's step timer and watchdog are Python that a full graph cannot hold), and the eager module
stays as it was, for every call the compiled graphs do not cover. Each distinct input shape is its
own graph (`dynamic=False`); on CUDA the reduce-overhead and max-autotune modes replay them from
CUDA graphs.
"""
from __future__ import annotations

from typing import Callable

import torch

COMPILE_MODES = ("default", "max-autotune", "reduce-overhead")


def compile_unet(unet: torch.nn.Module, mode: str = "default", backend: str = "inductor",
                 fullgraph: bool = True) -> Callable:
    """`unet.forward` under torch.compile: same arguments and results as the forward, compiled on
    its first call for each input shape. `mode` is inductor's; other backends (aot_eager: the traced
    graph run without code generation, seconds instead of minutes on CPU) take none."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; use one of {', '.join(COMPILE_MODES)}")
    forward = type(unet).forward.__get__(unet)
    options = {"mode": mode} if backend == "inductor" else {}
    return torch.compile(forward, backend=backend, fullgraph=fullgraph, dynamic=False, **options)


_graphs = 0  # static-shape graphs compiled by this process so far


def allow_graphs(count: int) -> None:
    """Make room for `count` more compiled shapes: Dynamo keeps at most `recompile_limit` graphs per
    code object, and every U-Net of one class (all models, all devices) shares one forward."""
    global _graphs
    _graphs += count
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, _graphs)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, _graphs)


def is_recompile_refused(e: BaseException) -> bool:
    """The error torch raises under the `fail_on_recompile` stance, or any Dynamo/backend failure."""
    return isinstance(e, torch._dynamo.exc.TorchDynamoException) or (
        type(e) is RuntimeError and str(e).startswith("Detected recompile"))
