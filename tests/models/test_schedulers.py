"""The one scheduler swap (vqdm.models.schedulers): the class asked for, built from the config, and
the pipeline's own scheduler back after the block, also when the block raises."""
from __future__ import annotations

import types

import pytest
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from vqdm.models.schedulers import scheduler_from, swapped_scheduler


def test_swap_builds_from_the_current_config_and_restores():
    own = EulerDiscreteScheduler(num_train_timesteps=500, beta_start=0.001, timestep_spacing="leading")
    pipe = types.SimpleNamespace(scheduler=own)
    with swapped_scheduler(pipe, "DDIMScheduler") as p:
        assert p is pipe and isinstance(pipe.scheduler, DDIMScheduler)
        assert dict(pipe.scheduler.config) == dict(DDIMScheduler.from_config(own.config).config)
        assert pipe.scheduler.config.num_train_timesteps == 500 and pipe.scheduler.config.beta_start == 0.001
    assert pipe.scheduler is own
    with pytest.raises(RuntimeError), swapped_scheduler(pipe, "DDIMScheduler"):
        raise RuntimeError("inside the block")
    assert pipe.scheduler is own


def test_swap_from_a_given_config_is_fresh_each_time():
    config = {k: v for k, v in EulerDiscreteScheduler(timestep_spacing="trailing").config.items() if not k.startswith("_")}
    pipe = types.SimpleNamespace(scheduler=DDIMScheduler())
    with swapped_scheduler(pipe, "EulerDiscreteScheduler", config):
        first = pipe.scheduler
        assert isinstance(first, EulerDiscreteScheduler) and first.config.timestep_spacing == "trailing"
    assert scheduler_from("EulerDiscreteScheduler", config) is not first
