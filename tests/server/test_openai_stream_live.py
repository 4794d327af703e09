"""OpenAI's image streaming, driven by the official `openai` package against a live `vqdm serve` on
the embedded default (no --model; 32x32 digits, 20 steps): partial images then the completed
event, in the SDK's own event types (checked strictly), for generations and edits; the final image
is the non-streamed one of the same seed; a bad `partial_images` is a 400 and a job cancelled
mid-stream ends the SDK's iteration with an APIError."""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.server.conftest import LiveServer

    # No model flag: the embedded default. One torch thread and no warm-up: readiness in seconds on a
    # loaded 2-core machine, where a second thread only spin-waits.
    live = LiveServer(["--no-warmup", "--cpu-threads", "1"],
                      tmp_path_factory.mktemp("openai-stream") / "server.log").wait_ready()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base + "/v1", api_key="no-keys-configured", max_retries=0)


def png(b64: str) -> np.ndarray:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def strictly(event):
    """The event re-validated by its SDK type (the SDK itself builds events leniently)."""
    return type(event).model_validate(event.to_dict())


def test_generate_streams_partials_then_the_same_image_as_unstreamed(client):
    from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent

    prompt = "a handwritten digit 3"
    events = list(client.images.generate(prompt=prompt, stream=True, partial_images=2, extra_body={"seed": 7}))
    assert [type(e) for e in events] == [ImageGenPartialImageEvent] * 2 + [ImageGenCompletedEvent]
    events = [strictly(e) for e in events]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(e.size == "32x32" and e.output_format == "png" for e in events)
    partials = [png(e.b64_json) for e in events[:2]]
    assert all(p.shape == (32, 32, 3) for p in partials)
    final = png(events[-1].b64_json)
    assert (events[-1].usage.output_tokens, events[-1].usage.input_tokens_details.image_tokens) == (64, 0)
    assert events[-1].usage.input_tokens_details.text_tokens > 2  # start, end and the prompt's own tokens
    plain = client.images.generate(prompt=prompt, response_format="b64_json", extra_body={"seed": 7})
    assert np.array_equal(final, png(plain.data[0].b64_json))
    # Previews approach the image: the later one is closer to it.
    errors = [np.abs(p.astype(int) - final).mean() for p in partials]
    assert errors[1] < errors[0]


def test_edit_streams_a_partial_then_the_same_image_as_unstreamed(client):
    from openai.types import ImageEditCompletedEvent, ImageEditPartialImageEvent
    from PIL import Image

    source = np.full((32, 32, 3), 255, np.uint8)
    source[8:24, 14:18] = 0  # a dark stroke on white, like the digits the model draws
    buf = io.BytesIO()
    Image.fromarray(source).save(buf, "PNG")
    upload = ("source.png", buf.getvalue(), "image/png")
    events = list(client.images.edit(image=upload, prompt="a handwritten digit 1", stream=True, partial_images=1,
                                     extra_body={"seed": 3}))
    assert [type(e) for e in events] == [ImageEditPartialImageEvent, ImageEditCompletedEvent]
    partial, done = (strictly(e) for e in events)
    assert partial.partial_image_index == 0 and png(partial.b64_json).shape == (32, 32, 3)
    assert done.usage.input_tokens_details.image_tokens == 64  # the encoded source's latent cells
    plain = client.images.edit(image=upload, prompt="a handwritten digit 1", extra_body={"seed": 3})
    assert np.array_equal(png(done.b64_json), png(plain.data[0].b64_json))


def test_n_images_each_get_partials_and_a_completed_event(client):
    events = list(client.images.generate(prompt="handwritten 7", n=2, stream=True, partial_images=1,
                                         extra_body={"seed": 11, "num_inference_steps": 4}))
    kinds = [(e.type, e.index) for e in events]  # `index` (which image) is vqdm's; OpenAI's types have none
    assert kinds == [("image_generation.partial_image", 0), ("image_generation.partial_image", 1),
                     ("image_generation.completed", 0), ("image_generation.completed", 1)]
    assert [e.seed for e in events[2:]] == [11, 12]


def test_bad_partial_images_is_a_400_and_a_cancelled_stream_raises(client, server):
    import openai

    for bad in (-1, 4):
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(prompt="x", stream=True, partial_images=bad)
        assert e.value.param == "partial_images"
    stream = client.images.generate(prompt="x", stream=True, partial_images=1, extra_headers={"X-Request-Id": "walk"},
                                    extra_body={"num_inference_steps": 80})
    seen = []
    with pytest.raises(openai.APIError) as e:
        for event in stream:
            seen.append(event.type)
            if len(seen) == 1:  # running (its one preview comes after step 40): cancel it from outside
                assert httpx.delete(server.base + "/v1/requests/walk", timeout=30).status_code in (200, 202)
    assert seen == ["image_generation.partial_image"]
    assert e.value.code == "request_cancelled" and "cancelled" in e.value.message


def test_a_size_drawn_elsewhere_streams_every_image_at_the_size_asked(client):
    """Size policy nearest (the embedded default's): 64x64 is drawn at 32x32 and resized; the partial
    images come at the asked size too, and the events say both sizes."""
    events = [strictly(e) for e in client.images.generate(prompt="a handwritten digit 5", size="64x64", stream=True,
                                                          partial_images=1, extra_body={"seed": 2})]
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert all(e.size == "64x64" and e.model_extra["generated_size"] == "32x32" for e in events)
    assert all(png(e.b64_json).shape == (64, 64, 3) for e in events)
