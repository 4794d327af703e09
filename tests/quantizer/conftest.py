"""Tiny diffusers folders shared by the quantizer driver, CLI and distributed tests (written once per session)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from vqdm.models import make_model

    return make_model("tiny-sdxl", tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_turbo_dir(tmp_path_factory):
    from vqdm.models import make_model

    return make_model("tiny-sdxl-turbo", tmp_path_factory.mktemp("models") / "tiny-sdxl-turbo", seed=1)
