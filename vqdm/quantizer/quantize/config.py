"""`vqdm quantize` settings: the per-layer AQ config of a run (the calibration recipe of each
family is in `vqdm.quantizer.recipes`)."""
from __future__ import annotations

import dataclasses

from vqdm.errors import ConfigError
from vqdm.quantizer.layer.aq import AQConfig
from vqdm.quantizer.sampling import named_seed
from vqdm.vq_format import GROUP_SIZE, NBITS, VQFormat


def make_aq_config(num_codebooks: int, nbits: int = NBITS, group_size: int = GROUP_SIZE, **knobs):
    """An AQConfig with the format fields and any non-None knobs (beam_size, adam_steps, ...)."""
    VQFormat(num_codebooks, nbits, group_size).check_artifact()
    fields = {f.name for f in dataclasses.fields(AQConfig)}
    chosen = {k: v for k, v in knobs.items() if v is not None}
    unknown = sorted(set(chosen) - fields)
    if unknown:
        raise ConfigError(f"unknown AQ setting(s) {unknown}; AQConfig has {sorted(fields)}")
    try:
        return AQConfig(num_codebooks=num_codebooks, nbits=nbits, group_size=group_size, **chosen)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid AQ settings: {e}") from None


def layer_config(aq: AQConfig, seed: int, name: str) -> AQConfig:
    """The run's AQConfig with its seed (if it has one) set per layer, from (run seed, layer name)."""
    if "seed" in {f.name for f in dataclasses.fields(aq)}:
        return dataclasses.replace(aq, seed=named_seed(seed, name))
    return aq
