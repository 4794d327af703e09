"""The one scheduler swap: a pipeline's scheduler replaced by a fresh instance of another diffusers
scheduler class built from a config, for the length of a block. The quantizer's sampling loop
swaps SDXL to DDIM this way; the server swaps in the sampler each batch asks for."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping


def scheduler_from(class_name: str, config: Mapping[str, Any]):
    """A fresh `diffusers.<class_name>` from `config` (a scheduler's config; it keeps no state of a run)."""
    import diffusers  # deferred: diffusers costs seconds of start-up, and vqdm.models does not need it to load

    return getattr(diffusers, class_name).from_config(config)


@contextlib.contextmanager
def swapped_scheduler(pipe, class_name: str, config: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """`pipe.scheduler` is a fresh `class_name` built from `config` (default: the current scheduler's
    own config) inside the block, and the scheduler it replaced again after it."""
    saved = pipe.scheduler
    pipe.scheduler = scheduler_from(class_name, saved.config if config is None else config)
    try:
        yield pipe
    finally:
        pipe.scheduler = saved
