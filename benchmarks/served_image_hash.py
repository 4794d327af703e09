"""Hashes of images the server draws for fixed requests: a refactor that claims "behaviour
unchanged" must reproduce them bit for bit.

The server starts exactly as `vqdm serve` does with no model (the embedded default, one CPU thread so
that float reductions run in one order), answers through its HTTP API in-process, and every image is
hashed twice: the decoded RGB pixels (what the model drew) and the PNG bytes (what the client got).

    python benchmarks/served_image_hash.py --json benchmarks/results/served_image_hash.json
    python benchmarks/served_image_hash.py --check benchmarks/results/served_image_hash.json   # exit 1 on a mismatch
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_commit, machine  # noqa: E402  (sibling module)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# The README's example request, and one of each digit at another seed and step count.
REQUESTS = [{"prompt": "a handwritten digit 3", "seed": 7}] + [
    {"prompt": f"a handwritten digit {d}", "seed": 100 + d, "num_inference_steps": 8} for d in range(10)]


def start_client():
    """A TestClient on the app `vqdm serve` builds with no model configured, once /readyz says 200."""
    # imported here, after main sets HF_HUB_OFFLINE: the hub reads it when it is imported
    from fastapi.testclient import TestClient

    from vqdm.server import threads
    from vqdm.server.app import create_app
    from vqdm.server.settings import Settings

    settings = Settings(devices=["cpu"], cpu_threads=1)
    threads.apply(settings.cpu_threads)  # as `vqdm serve` does before it builds the app
    client = TestClient(create_app(settings))
    client.__enter__()
    deadline = time.monotonic() + 600
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise SystemExit(f"not ready after 600 s: {client.get('/readyz').text}")
        time.sleep(0.1)
    return client


def draw(client, request: dict) -> dict:
    r = client.post("/v1/images/generations", json=request)
    if r.status_code != 200:
        raise SystemExit(f"{request}: HTTP {r.status_code} {r.text}")
    png = base64.b64decode(r.json()["data"][0]["b64_json"])
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return {"request": request, "size": list(pixels.shape[:2]),
            "pixels_sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
            "png_sha256": hashlib.sha256(png).hexdigest()}


def measure() -> dict:
    client = start_client()
    try:
        model = client.get("/v1/models").json()["data"][0]["id"]
        images = [draw(client, req) for req in REQUESTS]
    finally:
        client.__exit__(None, None, None)
    return {"what": "sha256 of images the embedded default draws through the HTTP API (vqdm serve, no model)",
            "command": "python benchmarks/served_image_hash.py --json benchmarks/results/served_image_hash.json",
            "commit": git_commit(), "machine": machine(), "threads": torch.get_num_threads(), "model": model,
            "images": images}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--check", type=Path, help="compare with a recorded result; exit 1 if any hash differs")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = measure()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.check:
        recorded = json.loads(args.check.read_text())
        pairs = list(zip(recorded["images"], result["images"], strict=True))
        same = [a["pixels_sha256"] == b["pixels_sha256"] and a["png_sha256"] == b["png_sha256"] for a, b in pairs]
        print(f"{sum(same)}/{len(same)} images identical to {args.check} (recorded at {recorded['commit']})")
        return 0 if all(same) else 1
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
