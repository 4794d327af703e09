"""Compiled serving (vqdm.server.compiled): /readyz waits for the buckets to compile, compiled
images equal eager ones, and every step that could not use a graph is counted with its reason.

The app here compiles with torch.compile's `eager` backend: the same Dynamo capture (whole graph,
guards, the refusal to recompile after start-up) without code generation, which would take minutes
on this 2-core machine; inductor's numerics are checked on a small U-Net in
tests/models/test_compile.py."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from vqdm.server.jobs import GenerationParams
from vqdm.server.runner import Member, run_batch

GEN = "/v1/images/generations"
SHAPES = ["1x128x128"]  # the dense tiny Turbo: 128², no CFG, one image


def params(n=1, side=128, steps=3, seed=3, scheduler="euler_a") -> GenerationParams:
    return GenerationParams(model="turbo", prompt=f"prompt {seed}", negative_prompt=None, n=n, width=side,
                            height=side, steps=steps, guidance=0.0, scheduler=scheduler, seed=seed)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, tools):
    path = tmp_path_factory.mktemp("loras") / "pixel.safetensors"
    tools.make_lora_file(path, seed=1, rank=4, alpha=4)
    return path


@pytest.fixture(scope="module")
def compiled_app(turbo_folder, lora_file):
    """A started app serving its own copy of the dense tiny Turbo, compiled for SHAPES; compiling
    waits until the test has seen /readyz while it runs (`seen_503`)."""
    from fastapi.testclient import TestClient

    from vqdm.server import warmup
    from vqdm.server.app import create_app
    from vqdm.server.loader import load_model
    from vqdm.server.settings import ModelSpec, Settings

    # Warm-up generation off: the buckets compile all the same before /readyz turns 200.
    settings = Settings(devices=["cpu"], compile="default", compile_backend="eager", compile_shapes=SHAPES,
                        loras=[f"pixel={lora_file}"], max_batch_size=2, warmup=False)
    models = [load_model(ModelSpec("turbo", turbo_folder), settings, ["cpu"])]
    compiling, release, done = threading.Event(), threading.Event(), threading.Event()
    real = warmup.compile_replica

    def gated(*args):
        compiling.set()
        assert release.wait(120), "the test never released the compile"
        out = real(*args)
        done.set()
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(warmup, "compile_replica", gated)
        client = TestClient(create_app(settings, loader=lambda s, d: list(models)))
        with client:
            assert compiling.wait(120), "compiling never started"
            seen_503 = client.get("/readyz")
            release.set()
            deadline = time.monotonic() + 300
            while client.get("/readyz").status_code != 200:
                assert client.app.state.vqdm.load_error is None, client.app.state.vqdm.load_error
                assert time.monotonic() < deadline, "not ready after 300 s"
                time.sleep(0.05)
            yield client, models[0].replicas["cpu"], seen_503, done.is_set()


def test_readyz_waits_for_the_compiled_buckets(compiled_app):
    client, replica, seen_503, done_when_ready = compiled_app
    assert seen_503.status_code == 503 and "warming up" in seen_503.json()["error"]["message"]
    assert done_when_ready  # /readyz turned 200 only after every bucket compiled
    assert [key[0] for key in replica.compiled.compiled] == [(1, 4, 16, 16)]
    assert client.get("/readyz").status_code == 200


def test_compiled_equals_eager_and_fallbacks_are_counted(compiled_app, served_models, tools):
    client, replica, _, _ = compiled_app
    body = {"model": "turbo", "prompt": "a lighthouse", "seed": 11, "num_inference_steps": 3, "size": "128x128"}
    before = tools.metric_samples(client.get("/metrics").text)
    got = tools.decode_png(client.post(GEN, json=body).json()["data"][0]["b64_json"])
    mid = tools.metric_samples(client.get("/metrics").text)
    assert tools.delta(before, mid, "vqdm_compiled_steps_total", mode="default", fallback="none") == 3

    # The same request on the session's eager copy of the same model folder.
    from vqdm.server.schemas import ImageGenerationRequest
    from vqdm.server.settings import Settings
    from vqdm.server.validation import validate

    eager = {m.id: m for m in served_models}["turbo"]
    p = validate(ImageGenerationRequest(**body), {"turbo": eager}, Settings(devices=["cpu"]))
    want = np.asarray(run_batch(eager.replicas["cpu"], [Member(p)]).images[0][0]).astype(np.int16)
    assert np.abs(got - want).max() <= 1

    for extra in ({"size": "64x64"}, {"loras": [{"name": "pixel", "scale": 1.0}]}, {}):
        assert client.post(GEN, json={**body, **extra}).status_code == 200
    after = tools.metric_samples(client.get("/metrics").text)
    counts = {f: tools.delta(mid, after, "vqdm_compiled_steps_total", mode="default", fallback=f)
              for f in ("none", "shape", "lora", "shrink", "cache", "error")}
    # After the adapter's batch the graphs still run: the LoRA hooks they were traced with are idle again.
    assert counts == {"none": 3, "shape": 3, "lora": 3, "shrink": 0, "cache": 0, "error": 0}


def test_a_shrinking_cancel_runs_eagerly_and_is_counted(compiled_app, tools):
    from vqdm.server.metrics import Metrics

    _, replica, _, _ = compiled_app
    flag = {"cancel": False}

    def on_step(step, total):
        if step == 1:
            flag["cancel"] = True

    # Two single-image jobs: the batch starts at 2 rows, outside the buckets; member 1 is cancelled
    # during step 2, the batch shrinks to one row (a bucket) and stays eager, counted "shrink".
    out = run_batch(replica, [Member(params(steps=4, seed=3), on_step=on_step),
                              Member(params(steps=4, seed=4), is_cancelled=lambda: flag["cancel"])])
    assert out.cancelled_at_step == [None, 2] and out.compiled_steps == {"shape": 2, "shrink": 2}
    metrics = Metrics()
    metrics.batch_ran("turbo", out)
    samples = tools.metric_samples(metrics.exposition().decode())
    assert samples[("vqdm_compiled_steps_total", (("fallback", "shrink"), ("mode", "default")))] == 2
    # A batch that starts in a bucket and never shrinks runs compiled throughout.
    assert run_batch(replica, [Member(params(seed=5))]).compiled_steps == {"none": 3}


def test_a_weight_cache_policy_skips_compiling_and_counts_every_step(tiny_artifact):
    from vqdm.server.compiled import compile_replica
    from vqdm.server.loader import load_model
    from vqdm.server.settings import ModelSpec, Settings

    settings = Settings(devices=["cpu"], weight_cache="request")
    model = load_model(ModelSpec("tiny", tiny_artifact), settings, ["cpu"])
    replica = model.replicas["cpu"]
    compiled = compile_replica(replica, "default", "eager", [])
    assert compiled.skipped == "cache" and compiled.fn is None
    p = GenerationParams(model="tiny", prompt="x", negative_prompt=None, n=1, width=64, height=64, steps=2,
                         guidance=5.0, scheduler="euler", seed=1)
    assert run_batch(replica, [Member(p)]).compiled_steps == {"cache": 2}


def test_settings_flags_and_buckets(monkeypatch, served_models):
    from vqdm.cli import build_parser
    from vqdm.errors import ConfigError
    from vqdm.server import cli
    from vqdm.server.compiled import Bucket, buckets_for, compile_plan, resolve_mode
    from vqdm.server.settings import Settings, settings_from

    args = build_parser("serve").parse_args(["serve", "--compile", "reduce-overhead", "--compile-shape", "2x1024x1024",
                              "--compile-shape", "1x512x768", "--compile-backend", "aot_eager"])
    s = cli.build_settings(args)
    assert (s.compile, s.compile_shapes, s.compile_backend) == ("reduce-overhead", ["2x1024x1024", "1x512x768"],
                                                                "aot_eager")
    monkeypatch.setenv("VQDM_COMPILE", "auto")
    monkeypatch.setenv("VQDM_COMPILE_SHAPES", "1x64x64, 2x64x64")
    s = Settings()
    assert s.compile == "auto" and s.compile_shapes == ["1x64x64", "2x64x64"]
    assert resolve_mode("auto", "cuda:1") == "reduce-overhead"
    assert resolve_mode("max-autotune", "cpu") == "max-autotune"
    # auto on CPU: only fp32 shapes of at least SDXL's 1024² with guidance, where compiling measured faster
    sdxl = [Bucket(2, 1024, 1024), Bucket(4, 1024, 1024)]
    small = [Bucket(1, 512, 512), Bucket(2, 512, 512)]
    assert compile_plan("auto", "cpu", torch.float32, small + sdxl) == ("default", sdxl)
    assert compile_plan("auto", "cpu", torch.bfloat16, sdxl) == ("off", [])
    assert compile_plan("auto", "cpu", torch.float32, small) == ("off", [])
    assert compile_plan("auto", "cuda:0", torch.float16, small) == ("reduce-overhead", small)
    assert compile_plan("default", "cpu", torch.bfloat16, small) == ("default", small)
    assert compile_plan("off", "cpu", torch.float32, sdxl) == ("off", [])
    for bad, why in (("2x100", "ROWSxWIDTHxHEIGHT"), ("0x64x64", "rows >= 1"), ("1x60x64", "multiples of 8")):
        with pytest.raises(ConfigError, match=f"compile_shapes: .*{why}"):
            settings_from({"compile_shapes": [bad]})
    with pytest.raises(ConfigError, match="compile"):
        settings_from({"compile": "fast"})
    monkeypatch.delenv("VQDM_COMPILE_SHAPES")
    tiny, turbo = served_models  # tiny: guidance 5 (CFG, rows double); turbo: guidance 0
    assert buckets_for(Settings(max_batch_size=3), tiny) == [Bucket(2, 128, 128), Bucket(4, 128, 128),
                                                            Bucket(6, 128, 128)]
    assert buckets_for(Settings(max_batch_size=2), turbo) == [Bucket(1, 128, 128), Bucket(2, 128, 128)]
    assert buckets_for(Settings(compile_shapes=["1x64x64", "1x64x64"]), turbo) == [Bucket(1, 64, 64)]


def test_a_call_that_would_recompile_runs_eagerly_and_is_counted(compiled_app, caplog):
    """A module constant the graph was specialised on changes after start-up: the call is refused
    (nothing compiles during a request), runs eagerly, and counts as `error` from then on."""
    _, replica, _, _ = compiled_app
    time_proj = replica.pipe.unet.time_proj
    shift = time_proj.downscale_freq_shift
    time_proj.downscale_freq_shift = shift + 0.5
    try:
        out = run_batch(replica, [Member(params(steps=2))])
    finally:
        time_proj.downscale_freq_shift = shift
        refused, replica.compiled.refused = set(replica.compiled.refused), set()
    assert out.compiled_steps == {"error": 2} and len(refused) == 1
    assert any("refused shape (1, 4, 16, 16)" in r.getMessage() and "downscale_freq_shift" in r.getMessage()
               for r in caplog.records)
