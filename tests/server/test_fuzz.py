"""Schemathesis fuzz of every route in the server's own OpenAPI schema, the JSON generations body
and the multipart edits form included, against the app in process on the embedded default model:
no answer is a 5xx (or an exception), every 4xx is OpenAI's error shape, and afterwards the server
is still healthy and still generates and edits. Derandomized (the same cases every run) with no
example database, so CI is reproducible (hypothesis's constants cache, .hypothesis/, is git-ignored)."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.python import asgi

from tests.server.hostile_images import hostile_images
from vqdm.server.schemas import ErrorResponse

# Limits that keep every job the fuzz gets accepted small (one image of at most 64² for at most 2
# steps), so examples stay cheap; min_side 8 lets a small upload's own size through.
LIMITS = dict(max_n=1, max_batch_size=1, max_steps=2, min_side=8, max_side=64, max_pixels=64 * 64,
              max_queue_size=8, request_timeout_s=120)
IMAGE_ROUTES = ("POST /v1/images/generations", "POST /v1/images/edits", "POST /sdapi/v1/txt2img")
# Examples per operation: the image routes get the most.
EXAMPLES = {"POST /v1/images/edits": 60, "POST /v1/images/generations": 40, "POST /sdapi/v1/txt2img": 30}
# The fields of AUTOMATIC1111's txt2img kept in a body sent within limits: each of the others either
# asks for something vqdm refuses at a non-default value or sizes the job past the limits.
A1111_WITHIN_LIMITS = ("prompt", "negative_prompt", "seed", "cfg_scale", "send_images")
OTHER_EXAMPLES = 10
# Sides an upload is drawn from: few, so that an image and its mask often agree.
SIDES = (1, 8, 13, 32)
MODES = {"PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"), "JPEG": ("L", "RGB", "CMYK"), "WEBP": ("RGB", "RGBA")}


def image_files(fmt: str) -> st.SearchStrategy[bytes]:
    """Small real files of one format, in every mode it stores, with seeded noise for pixels; or one
    of the hostile files (bombs, truncations, odd modes and palettes, in any format) under its name."""
    real = st.builds(encode_image, st.just(fmt), st.sampled_from(SIDES), st.sampled_from(SIDES),
                     st.sampled_from(MODES[fmt]), st.integers(0, 2**16))
    return st.one_of(real, st.sampled_from([case.data for case in hostile_images()]))


def encode_image(fmt: str, w: int, h: int, mode: str, seed: int) -> bytes:
    from PIL import Image

    rgba = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    img = Image.fromarray(rgba, "RGBA")
    # PIL converts to these modes only from RGB
    img = img.convert("RGB").convert(mode) if mode in ("CMYK", "P", "1", "I;16") else img.convert(mode)
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def test_openapi_schema_declares_what_the_routes_read():
    """What the fuzz generates from: both image bodies declared and resolvable, every error OpenAI's shape."""
    from vqdm.server.app import create_app
    from vqdm.server.schemas import ImageGenerationRequest
    from vqdm.server.settings import Settings

    doc = create_app(Settings(devices=["cpu"])).openapi()

    def refs(node):
        if isinstance(node, dict):
            yield from ([node["$ref"]] if "$ref" in node else [])
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(doc):  # a dangling reference leaves a generator with no body to send at all
        target = doc
        for part in ref.removeprefix("#/").split("/"):
            assert part in target, f"{ref} does not resolve in /openapi.json"
            target = target[part]
    paths = doc["paths"]
    body = paths["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["prompt"] and body["additionalProperties"] is False
    form = paths["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]
    fields = form["schema"]["properties"]
    assert form["schema"]["required"] == ["image", "prompt"]
    assert fields["image"]["format"] == fields["mask"]["format"] == "binary"
    assert set(ImageGenerationRequest.model_fields) | {"image", "mask", "strength"} <= set(fields)
    assert fields["loras"]["type"] == "string"  # JSON text in a form
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in paths.items():
        for method, op in operations.items():
            assert "422" not in op["responses"], f"{method} {path} declares FastAPI's 422, which vqdm never sends"
            assert op["responses"]["4XX"]["content"]["application/json"]["schema"] == error, (method, path)


@pytest.fixture(scope="module")
def fuzz_app():
    """The app with the embedded default, started (lifespan) by schemathesis's in-process client."""
    from vqdm.server.app import create_app
    from vqdm.server.settings import Settings

    for fmt, media_type in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        schemathesis.openapi.media_type(media_type, image_files(fmt))
    app = create_app(Settings(devices=["cpu"], warmup=False, **LIMITS))
    with asgi.get_client(app) as client:
        deadline = time.monotonic() + 300
        while (r := client.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline and r.status_code == 503, f"never ready: {r.status_code} {r.text}"
            time.sleep(0.05)
        yield app, client
    asgi.shutdown_lifespans()


def check_answer(response) -> None:
    status = response.status_code
    assert status < 500, f"{status} {response.text[:500]}"
    if status >= 400:
        ErrorResponse.model_validate_json(response.content)  # OpenAI's shape, nothing more or less


@st.composite
def within_limits(draw, cases: st.SearchStrategy):
    """A body within this server's limits where they depend on its configuration, which the schema
    cannot say: num_inference_steps named (the embedded model's default, 20, is over max_steps), and
    no model, n or loras (only one id, n = 1 and no adapter are served); for AUTOMATIC1111's
    txt2img, `steps` and only the A1111_WITHIN_LIMITS fields. Without these few edits
    hardly a generation or edit would get past validation to the queue and the pipelines."""
    case = draw(cases)
    if isinstance(case.body, dict) and case.operation.path.startswith("/sdapi/"):
        for name in set(case.body) - set(A1111_WITHIN_LIMITS):
            case.body.pop(name)
        case.body["steps"] = draw(st.integers(1, LIMITS["max_steps"]))
    elif isinstance(case.body, dict):  # else the schema declares no body: the 200 check below fails
        for name in ("model", "n", "loras"):
            case.body.pop(name, None)
        case.body["num_inference_steps"] = draw(st.integers(1, LIMITS["max_steps"]))
    return case


def fuzz_operation(operation, statuses: set[int]) -> None:
    positive = operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE)
    strategies = [positive]
    if operation.path_parameters or operation.body:  # something to make invalid
        strategies.append(operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE))
    if operation.label in IMAGE_ROUTES:
        strategies.append(within_limits(positive))

    @settings(max_examples=EXAMPLES.get(operation.label, OTHER_EXAMPLES), derandomize=True, database=None,
              deadline=None, phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(strategies))
    def run(case):
        response = case.call(timeout=60)  # a request that hangs fails its example
        statuses.add(response.status_code)
        check_answer(response)

    run()


def test_fuzz_every_route_then_still_healthy(fuzz_app):
    app, client = fuzz_app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert set(IMAGE_ROUTES) <= {op.label for op in operations}
    failures, statuses = {}, {op.label: set() for op in operations}
    for operation in operations:
        try:
            fuzz_operation(operation, statuses[operation.label])
        except Exception as e:  # noqa: BLE001 - collected, so one bad route does not hide another
            notes = "\n".join(getattr(e, "__notes__", []))  # hypothesis's falsifying example, a curl command
            failures[operation.label] = f"{type(e).__name__}: {str(e)[:2000]}\n{notes}"
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
    # The fuzz got past validation to the queue and the pipelines on both image routes, not only 400s.
    assert all(200 in statuses[label] for label in IMAGE_ROUTES), {label: statuses[label] for label in IMAGE_ROUTES}

    assert client.get("/healthz").status_code == 200
    r = client.post("/v1/images/generations", json={"prompt": "a handwritten digit 3", "seed": 1,
                                                   "num_inference_steps": 2})
    assert r.status_code == 200 and len(r.json()["data"]) == 1, r.text
    png = encode_image("PNG", 32, 32, "RGB", seed=0)
    r = client.post("/v1/images/edits", files={"image": ("a.png", png, "image/png")},
                    data={"prompt": "a handwritten digit 3", "size": "32x32", "num_inference_steps": "2"})
    assert r.status_code == 200 and len(r.json()["data"]) == 1, r.text
