"""LoRA adapters per request: --lora files and folders, /v1/models listing, 400s for unknown adapters
and out-of-range scales, separate batches per adapter set, two in-flight requests with different
adapters each getting their own result, metrics, start-up errors and `vqdm generate --lora`."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tools):
    make_lora_file = tools.make_lora_file
    root = tmp_path_factory.mktemp("loras")
    make_lora_file(root / "pixel.safetensors", seed=1, rank=4, alpha=4)
    folder = root / "more"
    folder.mkdir()
    make_lora_file(folder / "ink.safetensors", seed=2, rank=8, alpha=8)
    make_lora_file(folder / "glow.safetensors", seed=3, rank=2, alpha=4)
    return root


def body(prompt="a cat", seed=5, **kw):
    return {"prompt": prompt, "seed": seed, "num_inference_steps": 2, "size": "64x64", **kw}


def image(tools, r):
    assert r.status_code == 200, r.text
    return tools.decode_png(r.json()["data"][0]["b64_json"])


def test_listing_per_request_adapters_errors_and_metrics(make_client, tools, loras):
    c = make_client(loras=[f"pixel-art={loras / 'pixel.safetensors'}", str(loras / "more")])
    cards = {m["id"]: m["loras"] for m in c.get("/v1/models").json()["data"]}
    assert [a["name"] for a in cards["tiny"]] == ["pixel-art", "glow", "ink"] == [a["name"] for a in cards["turbo"]]
    pixel = cards["tiny"][0]
    assert pixel["rank"] == 4 and pixel["components"] == ["unet"] and pixel["bytes"] > 0
    detail = c.get("/v1/models/tiny")
    assert detail.json()["loras"][2]["rank"] == 8
    for text in (c.get("/v1/models").text, detail.text):  # no file paths: the start-up log has them
        assert str(loras) not in text and "safetensors" not in text and '"source"' not in text
    assert pixel["scale_range"] == [-2.0, 2.0]

    before = tools.metric_samples(c.get("/metrics").text)
    base = image(tools, c.post(GEN, json=body()))
    styled = image(tools, c.post(GEN, json=body(loras=[{"name": "pixel-art", "scale": 1.5}])))
    again = image(tools, c.post(GEN, json=body(loras=[{"name": "pixel-art", "scale": 1.5}])))
    off = image(tools, c.post(GEN, json=body(loras=[{"name": "pixel-art", "scale": 0}])))
    two = image(tools, c.post(GEN, json=body(loras=[{"name": "ink", "scale": -1}, {"name": "pixel-art", "scale": 1.5}])))
    assert np.abs(styled - base).mean() > 2  # the adapter changes the image...
    assert np.abs(styled - again).max() <= 1  # ...the same way every time
    assert np.abs(off - base).max() <= 1  # scale 0 is no adapter
    assert np.abs(two - styled).mean() > 2
    # After adapters ran, a plain request is the plain image again (nothing left merged or active).
    assert np.abs(image(tools, c.post(GEN, json=body())) - base).max() <= 1

    bad = [({"loras": [{"name": "nope"}]}, "loras.0.name", "lora_not_found"),
           ({"loras": [{"name": "ink", "scale": 2.5}]}, "loras.0.scale", "invalid_value"),
           ({"loras": [{"name": "ink", "scale": -2.01}]}, "loras.0.scale", "invalid_value"),
           ({"loras": [{"name": "ink"}, {"name": "ink"}]}, "loras.1.name", "invalid_value"),
           ({"loras": [{"name": "ink", "weight": 1}]}, "loras.0.weight", "unknown_parameter"),
           ({"loras": "ink"}, "loras", "invalid_value")]
    for extra, param, code in bad:
        r = c.post(GEN, json=body(**extra))
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
        assert r.json()["error"]["code"] == code, r.text
    after = tools.metric_samples(c.get("/metrics").text)
    assert tools.delta(before, after, "vqdm_lora_requests_total", model="tiny", lora="pixel-art") == 3
    assert tools.delta(before, after, "vqdm_lora_requests_total", model="tiny", lora="ink") == 1
    assert sum(tools.delta(before, after, "vqdm_requests_total", model=m, status="400")  # "unknown": refused
               for m in ("tiny", "unknown")) == len(bad)  # before the model field was read


def test_different_adapter_sets_in_flight_get_their_own_results(make_client, tools, loras):
    c = make_client(loras=[f"pixel={loras / 'pixel.safetensors'}", f"ink={loras / 'more' / 'ink.safetensors'}"],
                    max_batch_size=8, max_steps=5000)
    requests = {"a": body(seed=9, loras=[{"name": "pixel", "scale": 1.0}]),
                "b": body(seed=9, loras=[{"name": "ink", "scale": 1.0}]),
                "c": body(seed=9, loras=[{"name": "pixel", "scale": 1.0}]),
                "d": body(seed=9)}
    results: dict = {}
    labels = {rid: f"lora-{rid}-{time.time_ns()}" for rid in [*requests, "blocker"]}

    def go(rid, req):
        results[rid] = c.post(GEN, json=req, headers={"X-Request-Id": labels[rid]})

    def state(rid):
        r = c.get(f"/v1/requests/{labels[rid]}")
        return r.json() if r.status_code == 200 else {"state": None, "step": 0}

    def wait_until(ok, what):
        deadline = time.monotonic() + 120
        while not ok():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    # A long blocker holds the worker until all four wait in the queue together, whatever the load.
    blocker = threading.Thread(target=go, args=("blocker", body(prompt="blocker", num_inference_steps=5000)))
    blocker.start()
    wait_until(lambda: state("blocker")["state"] == "running" and state("blocker")["step"] > 0, "the blocker to run")
    threads = [threading.Thread(target=go, args=(rid, req)) for rid, req in requests.items()]
    for t in threads:
        t.start()
    wait_until(lambda: all(state(rid)["state"] == "queued" for rid in requests), "all four to be queued")
    assert c.delete(f"/v1/requests/{labels['blocker']}").status_code in (200, 202)
    for t in [blocker, *threads]:
        t.join(120)
    assert results["blocker"].status_code == 499
    sizes = {rid: results[rid].json()["batch_size"] for rid in requests}
    # a and c share an adapter set and waited together: one batch; b and d never join another set.
    assert sizes == {"a": 2, "b": 1, "c": 2, "d": 1}, sizes
    got = {rid: image(tools, results[rid]) for rid in requests}
    for rid, req in requests.items():
        alone = image(tools, c.post(GEN, json=req))
        assert np.abs(got[rid] - alone).max() <= 1, rid
    assert np.abs(got["a"] - got["b"]).mean() > 2 and np.abs(got["a"] - got["d"]).mean() > 2
    assert np.abs(got["a"] - got["c"]).max() <= 1


def test_take_batch_keeps_adapter_sets_apart():
    from vqdm.server.batching import Dispatcher
    from vqdm.server.jobs import GenerationParams, Job
    from vqdm.server.metrics import Metrics
    from vqdm.server.settings import Settings

    import asyncio

    async def run():
        d = Dispatcher(Settings(devices=["cpu"], max_batch_size=8), Metrics(), ["cpu"])
        d.accepting = True
        common = dict(model="tiny", prompt="x", negative_prompt=None, n=1, width=64, height=64, steps=2,
                      guidance=5.0, scheduler="euler", seed=0)
        sets = [(("a", 1.0),), (("b", 1.0),), (("a", 1.0),), (), (("a", 0.5),), (("a", 1.0),)]
        for i, s in enumerate(sets):
            d.submit(Job(f"j{i}", GenerationParams(**common, loras=s)))
        return [[j.id for j in d._take_batch()] for _ in range(4)]

    assert asyncio.run(run()) == [["j0", "j2", "j5"], ["j1"], ["j3"], ["j4"]]


def test_bad_adapter_stops_start_up_with_the_key(served_models, loras, tmp_path):
    from fastapi.testclient import TestClient
    from safetensors.torch import load_file, save_file

    from vqdm.server.app import create_app
    from vqdm.server.settings import Settings

    sd = load_file(loras / "pixel.safetensors")
    key = next(k for k in sd if k.endswith("to_q.lora_A.weight"))
    sd[key] = torch.zeros(4, 7)
    save_file(sd, tmp_path / "broken.safetensors")
    cases = [([str(tmp_path / "broken.safetensors")], "1GB", key.removesuffix(".lora_A.weight")),
             ([f"pixel={loras / 'pixel.safetensors'}"], "1KB", "does not fit the LoRA memory budget")]
    for entries, budget, needle in cases:
        fatal: list[str] = []
        app = create_app(Settings(devices=["cpu"], loras=entries, lora_memory_budget=budget),
                         loader=lambda s, d: list(served_models), on_fatal=fatal.append)
        with TestClient(app) as c:
            deadline = time.monotonic() + 30
            while not fatal and time.monotonic() < deadline:
                time.sleep(0.02)
            assert fatal and needle in fatal[0], fatal
            assert c.get("/healthz").status_code == 503


def test_budget_counts_the_cached_branch_and_reads_the_header_first(make_client, served_models, loras, tmp_path):
    """On CPU an active adapter's branch is cached in fp32, twice its fp16 at rest: the budget counts
    both (3x the adapter's bytes fits, one byte less does not). A file too big for the budget is
    refused from its header, before its tensors are read."""
    import json

    from fastapi.testclient import TestClient

    from vqdm.models.lora import load_lora
    from vqdm.server.app import create_app
    from vqdm.server.settings import Settings

    pixel = loras / "pixel.safetensors"
    replica = served_models[0].replicas["cpu"]
    assert replica.pipe.unet.dtype == torch.float32
    at_rest = load_lora(pixel, replica.pipe).nbytes  # fp16
    huge = tmp_path / "huge.safetensors"  # a header claiming 128 MB of fp16 weights over a sparse file
    header = json.dumps({"unet.conv_in.lora_A.weight": {"dtype": "F16", "shape": [65536, 1024],
                                                        "data_offsets": [0, 1 << 27]}}).encode()
    with huge.open("wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + (1 << 27))

    for entries, budget, needle in (([f"pixel-art={pixel}"], str(3 * at_rest - 1), "cached while requests use it"),
                                     ([str(huge)], "64MB", "the file was not read")):
        fatal: list[str] = []
        app = create_app(Settings(devices=["cpu"], loras=entries, lora_memory_budget=budget),
                         loader=lambda s, d: list(served_models), on_fatal=fatal.append)
        with TestClient(app):
            deadline = time.monotonic() + 60
            while not fatal and time.monotonic() < deadline:
                time.sleep(0.02)
        assert fatal and "does not fit the LoRA memory budget" in fatal[0] and needle in fatal[0], fatal

    c = make_client(loras=[f"pixel-art={pixel}"], lora_memory_budget=str(3 * at_rest))
    assert c.post(GEN, json=body(loras=[{"name": "pixel-art", "scale": 1.0}])).status_code == 200
    assert replica.loras.cached_nbytes == 2 * at_rest  # what the budget counted is what is held


def test_settings_and_cli(loras, tmp_path, monkeypatch, tiny_artifact):
    from vqdm.cli import main
    from vqdm.server.cli import parse_generate_lora
    from vqdm.server.loras import lora_specs
    from vqdm.server.settings import Settings

    monkeypatch.setenv("VQDM_LORAS", f"pixel={loras / 'pixel.safetensors'},{loras / 'more'}")
    s = Settings()
    assert [x.name for x in lora_specs(s.loras)] == ["pixel", "glow", "ink"] and s.lora_memory_budget == "1GB"
    with pytest.raises(ValueError, match="given twice"):
        lora_specs([str(loras / "pixel.safetensors"), f"pixel={loras / 'more' / 'ink.safetensors'}"])
    with pytest.raises(Exception, match="byte count"):
        Settings(lora_memory_budget="lots")
    assert parse_generate_lora("/a/b.safetensors:0.7") == (tmp_path.__class__("/a/b.safetensors"), 0.7)
    assert parse_generate_lora("c:/x.safetensors")[1] == 1.0

    out = tmp_path / "cat.png"
    argv = ["generate", "a cat", "--model", str(tiny_artifact), "-o", str(out), "--steps", "1", "--size", "64x64",
            "--seed", "3"]
    assert main(argv) == 0
    plain = out.read_bytes()
    assert main(argv + ["--lora", f"{loras / 'pixel.safetensors'}:1.5"]) == 0
    assert out.read_bytes() != plain
    assert main(argv + ["--lora", f"{loras / 'pixel.safetensors'}:5"]) == 1  # scale outside [-2, 2]
