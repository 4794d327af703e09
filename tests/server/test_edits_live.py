"""Image edits on a live `vqdm serve` with no flags (the embedded default, 32x32): `size` auto
works on its own size and grows a too-small upload to the limits, and /healthz stays fast while
ten 4096² uploads decode (they decode in worker threads; on the event loop they held /healthz
for seconds)."""
from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

EDITS = "/v1/images/edits"


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def big_photo(side: int = 4096) -> bytes:
    """A side x side JPEG, smooth enough to stay far under max_image_bytes (16 MiB)."""
    ramp = (np.arange(side) * 256 // side).astype(np.uint8)
    img = np.empty((side, side, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = ramp[None, :], ramp[:, None], 90
    return encode(img, "JPEG")


def edit(base: str, image: bytes, **fields) -> httpx.Response:
    data = {"prompt": "a digit", "num_inference_steps": "2", "seed": "3", **fields}
    return httpx.post(base + EDITS, files={"image": ("image.png", image, "application/octet-stream")}, data=data,
                      timeout=300)


def output_size(r: httpx.Response) -> tuple[int, int]:
    import base64

    from PIL import Image

    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).size


def test_embedded_default_edits_and_healthz_stays_fast_while_uploads_decode(live_server):
    base = live_server([]).wait_ready().base
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[8:24, 12:20] = 255
    assert output_size(edit(base, encode(rgb))) == (32, 32)  # size auto: the model's own size
    assert output_size(edit(base, encode(np.zeros((24, 40, 3), np.uint8)))) == (104, 64)  # grown to min_side 64

    upload = big_photo()
    assert len(upload) < 16 << 20
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=base, timeout=60) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with ThreadPoolExecutor(10) as pool:
            replies = list(pool.map(lambda i: edit(base, upload, size="64x64", seed=str(i)), range(10)))
    finally:
        stop.set()
        prober.join(60)
    assert [r.status_code for r in replies] == [200] * 10, [r.text for r in replies if r.status_code != 200]
    assert len(latencies) >= 20
    p99 = float(np.percentile(latencies, 99))
    print(f"/healthz during 10 concurrent 4096² edits: {len(latencies)} probes, p50 "
          f"{np.percentile(latencies, 50) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
    assert p99 < 0.25, f"/healthz p99 {p99 * 1000:.0f} ms"
