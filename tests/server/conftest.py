"""Models and app helpers for the server tests: one tiny VQ artifact (quantized with the simple
test quantizer, saved and loaded through the real artifact path) and one dense tiny Turbo folder,
each loaded once per session and handed to every app the tests build."""
from __future__ import annotations

import base64
import contextlib
import io
import time

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, simple_quantizer):
    from vqdm.models import build_pipeline, quantize_layers
    from vqdm.models.artifact import save_artifact

    pipe = build_pipeline("tiny-sdxl", seed=0)
    quantize_layers(pipe.unet, 2, simple_quantizer(2))
    return save_artifact(pipe, tmp_path_factory.mktemp("models") / "tiny-vq2", {"base_model": {"name": "tiny-sdxl"}})


@pytest.fixture(scope="session")
def turbo_folder(tmp_path_factory):
    from vqdm.models import make_model

    return make_model("tiny-sdxl-turbo", tmp_path_factory.mktemp("models") / "turbo", seed=1)


@pytest.fixture(scope="session")
def served_models(tiny_artifact, turbo_folder):
    """[tiny (VQ artifact), turbo (dense folder)], loaded with the server's own loader."""
    from vqdm.server.loader import load_model
    from vqdm.server.settings import ModelSpec, Settings

    settings = Settings(devices=["cpu"])
    return [load_model(ModelSpec("tiny", tiny_artifact), settings, ["cpu"]),
            load_model(ModelSpec("turbo", turbo_folder), settings, ["cpu"])]


def wait_ready(get, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"server not ready after {timeout}s: {get('/readyz').text}")


@pytest.fixture
def make_client(served_models):
    """make_client(**settings) -> a started TestClient serving the session models."""
    from fastapi.testclient import TestClient

    from vqdm.server.app import create_app
    from vqdm.server.settings import Settings

    stack = contextlib.ExitStack()

    def make(**overrides):
        settings = Settings(**{"devices": ["cpu"], **overrides})
        app = create_app(settings, loader=lambda s, d: list(served_models))
        client = stack.enter_context(TestClient(app))
        wait_ready(client.get)
        return client

    with stack:
        yield make


def decode_png(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)


def metric_samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} from a /metrics body, via prometheus-client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def make_lora_file(path, seed: int, rank: int, alpha: float) -> None:
    """A real PEFT LoRA on the tiny U-Net (B made non-zero), saved in the diffusers layout."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from vqdm.models import build_unet

    unet = build_unet("tiny-sdxl", seed=0)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_v", "to_out.0", "conv1", "proj_out"],
                     init_lora_weights="gaussian")
    inject_adapter_in_model(cfg, unet)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3 if "lora_B" in n else 1.0 / rank**0.5)
    StableDiffusionXLPipeline.save_lora_weights(path.parent, unet_lora_layers=get_peft_model_state_dict(unet),
                                                weight_name=path.name)


@pytest.fixture(scope="session")
def tools():
    """The helpers above, for test modules (conftest is not importable under importlib mode)."""
    import types

    return types.SimpleNamespace(decode_png=decode_png, metric_samples=metric_samples, delta=delta,
                                 wait_ready=wait_ready, free_port=free_port,
                                 make_lora_file=make_lora_file, LiveServer=LiveServer)


class LiveServer:
    """A real `vqdm serve` process on a free loopback port, started with the given flags/env."""

    def __init__(self, args: list[str], log_path, env: dict | None = None, port: int | None = None) -> None:
        import os
        import subprocess
        import sys

        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "vqdm.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--json-logs", *args]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("VQDM_")}
        full_env.update(env or {})
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)

    def wait_ready(self, timeout: float = 300) -> "LiveServer":
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.base + "/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not become ready:\n{self.log()[-4000:]}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict]:
        import json

        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def stop(self) -> None:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(tmp_path):
    """live_server(args, env=None, port=None) -> a started LiveServer (not yet ready: call
    .wait_ready()); every one started is stopped at the end of the test. `live_server.free_port()`
    picks a port ahead, for servers that must know each other's address."""
    started: list[LiveServer] = []

    def start(args: list[str], env: dict | None = None, port: int | None = None) -> LiveServer:
        server = LiveServer(args, tmp_path / f"server-{len(started)}.log", env, port)
        started.append(server)
        return server

    start.free_port = free_port
    yield start
    for server in started:
        server.stop()
