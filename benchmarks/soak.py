"""Soak: a live `vqdm serve` under mixed traffic for a long time, watched for leaks, stalls and lost jobs.

Starts `vqdm serve` on the embedded default with two API keys and a short job retention, then runs
`--clients` closed-loop clients for `--duration-s` (default 30 minutes). Client i draws its actions
from random.Random(f"{seed}-{i}"), so every run sends the same sequence of actions (how many of it
fit in the time depends on the machine): JSON and streamed generations, img2img and inpainting
edits, cancels by job id (read from the stream's first event) and by X-Request-Id label, client
disconnects (a read timeout, or a stream closed after its first event) and status polls (with the
job's own key: 200 or 404; with the other key: always 404). Clients alternate between the keys.

Every --sample-s it records the server's RSS and threads (/proc/PID/status), its open file
descriptors (/proc/PID/fd), the event-loop lag histogram and every reply so far by route and
status. Event-loop lag is measured in the server (`vqdm_event_loop_lag_seconds`: how late its loop
ran each tick of a 100 ms metronome, vqdm.server.loop_lag), not as a client's probe latency: that would add this
process's own scheduling and the loopback round trip to the figure, and sample the loop only when
a probe happens to be in flight. At the end:

- RSS slope in MB per hour, least squares over the samples after --warmup-s, and its median growth
  (median RSS of the last third of those samples minus that of the first third), which neither the
  transient memory of a large upload being decoded at one sample nor a trim at another moves;
- fd growth: open fds once the clients have closed their connections, minus before the traffic;
- event-loop lag p50 / p99 over the run, from the histogram's buckets (interpolated within a bucket,
  as Prometheus's histogram_quantile does), and the ticks later than 250 ms;
- no lost job: the server counted every POST exactly once (vqdm_requests_total), its replies by
  status equal the client's plus the outcome of each job the client walked away from (read by
  label), no transport error, every stream ended with exactly one final event, and every cancel
  agreed with the reply its request got;
- forgotten: once the retention time has passed, every job answers 404 (none is held forever).

    python benchmarks/soak.py                                        # 30 min -> benchmarks/results/soak.json
    python benchmarks/soak.py --duration-s 120 --out /tmp/soak.json  # what tests/server/test_soak.py runs
    python benchmarks/soak.py --table benchmarks/results/soak.json   # the README table again
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import free_port  # noqa: E402  (sibling module)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from provenance import machine  # noqa: E402  (sibling module)

KEYS = ("soak-key-alpha-0001", "soak-key-bravo-0002")
GEN, EDIT = "/v1/images/generations", "/v1/images/edits"
ACTIONS = {"generate": 3, "stream": 2, "edit": 2, "cancel_by_id": 1, "cancel_by_label": 1, "disconnect": 1,
           "poll": 2}
LAG_METRIC = "vqdm_event_loop_lag_seconds"
# uvicorn closes a keep-alive connection idle for 5 s; a client that reused one at that moment would
# see a reset that is no fault of the server's, so clients let theirs go first.
KEEPALIVE_S = 4.0
LATE_S = 0.25  # a lag tick later than this would show as a slow /healthz
PHOTO = (4000, 3000)  # one edit upload in five: decoding and resizing it takes ~0.5 s of CPU


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 1800.0
    sample_s: float = 30.0
    warmup_s: float | None = None  # None: max(retention, duration / 6)
    retention_s: float = 120.0
    clients: int = 6
    seed: int = 0
    device: str = "cpu"
    startup_timeout_s: float = 600.0

    @property
    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else max(self.retention_s, self.duration_s / 6)


# -- the server ---------------------------------------------------------------------------------------
class SoakServer:
    """`vqdm serve` on the embedded default with the two keys; its /proc figures and its /metrics."""

    def __init__(self, cfg: SoakConfig, log_path: Path) -> None:
        self.base = f"http://127.0.0.1:{free_port()}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("VQDM_")}
        env.update(VQDM_API_KEYS=",".join(KEYS), VQDM_JOB_RETENTION_S=str(cfg.retention_s))
        cmd = [sys.executable, "-m", "vqdm.cli", "serve", "--host", "127.0.0.1", "--port", self.base.rsplit(":", 1)[1],
               "--log-level", "warning", "--device", cfg.device]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + cfg.startup_timeout_s
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"vqdm serve did not become ready:\n{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return httpx.get(self.base + "/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def proc_figures(self) -> dict:
        """RSS (MB), threads and open fds of the server process, from /proc."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        fields = dict(line.split(":", 1) for line in status if ":" in line)
        return {"rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 2), "threads": int(fields["Threads"]),
                "fds": len(os.listdir(f"/proc/{self.proc.pid}/fd"))}

    async def scrape(self, http: httpx.AsyncClient) -> dict:
        """The figures the soak reads from /metrics: lag buckets, POSTs by status, queue depth."""
        text = (await http.get(self.base + "/metrics")).text
        lag, requests, queue = {}, collections.Counter(), 0.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == LAG_METRIC + "_bucket":
                    lag[s.labels["le"]] = s.value
                elif s.name == "vqdm_requests_total":
                    requests[s.labels["status"]] += int(s.value)
                elif s.name == "vqdm_queue_depth":
                    queue = s.value
        return {"lag_buckets": lag, "requests": dict(requests), "queue_depth": queue}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


# -- what happened ------------------------------------------------------------------------------------
@dataclass
class Ledger:
    """Everything the clients sent and got back."""

    replies: collections.Counter = field(default_factory=collections.Counter)  # "POST generations 200" -> count
    posts_sent: int = 0
    post_status: collections.Counter = field(default_factory=collections.Counter)  # answered POSTs by final status
    walked_away: collections.Counter = field(default_factory=collections.Counter)  # server outcome of each
    jobs: list[tuple[int, str]] = field(default_factory=list)  # (key, id or label) of every admitted job
    faults: collections.Counter = field(default_factory=collections.Counter)  # what must never happen
    transport_errors: int = 0  # actions cut short by a connection error: a request without a reply

    def reply(self, method: str, path: str, status: int | str) -> None:
        route = path.split("/")[2] if path.startswith("/v1/requests/") else path.rsplit("/", 1)[1]
        self.replies[f"{method} {route} {status}"] += 1


def job_status(body: dict) -> int:
    """The status the server answered a finished job with (handling._outcome_error), from its status body."""
    if body["state"] == "succeeded":
        return 200
    if body["state"] == "cancelled":
        return {"timeout": 504, "shutdown": 503}.get(body.get("cancel_reason"), 499)
    return 503


def histogram_quantile(q: float, buckets: dict[str, float]) -> float | None:
    """Prometheus's histogram_quantile over cumulative buckets {le: count}: linear within a bucket."""
    edges = sorted((float(le), n) for le, n in buckets.items())
    total = edges[-1][1] if edges else 0
    if total <= 0:
        return None
    rank, lo, below = q * total, 0.0, 0.0
    for le, n in edges:
        if n >= rank:
            if le == float("inf"):
                return lo  # past the last finite bucket: its bound is all that is known
            return lo + (le - lo) * (rank - below) / max(n - below, 1e-12)
        lo, below = le, n
    return lo


def bucket_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {le: n - before.get(le, 0.0) for le, n in after.items()}


def rss_slope_mb_per_h(samples: list[dict], warmup_s: float) -> float | None:
    """Least-squares slope of RSS over the samples taken after the warm-up, in MB per hour."""
    pts = [(s["t_s"] / 3600, s["rss_mb"]) for s in samples if s["t_s"] >= warmup_s]
    if len(pts) < 3:
        return None
    t, rss = np.array(pts).T
    return round(float(np.polyfit(t, rss, 1)[0]), 2)


def rss_theil_sen_slope_mb_per_h(samples: list[dict], warmup_s: float) -> float | None:
    """Median of the slopes between every pair of samples after the warm-up, in MB per hour: a
    12-megapixel upload being decoded at the last sample tilts the least-squares line, a leak tilts
    this one too, a single sample does not."""
    pts = [(s["t_s"] / 3600, s["rss_mb"]) for s in samples if s["t_s"] >= warmup_s]
    slopes = [(r2 - r1) / (t2 - t1) for i, (t1, r1) in enumerate(pts) for t2, r2 in pts[i + 1:] if t2 > t1]
    return round(float(np.median(slopes)), 2) if len(pts) >= 3 else None


def rss_median_growth_mb(samples: list[dict], warmup_s: float) -> float | None:
    """Median RSS of the last third of the samples after the warm-up minus that of the first third:
    what a leak raises, while a decode in flight at one sample (a 12-megapixel upload is ~50 MB for a
    moment) or memory handed back to the OS at another does not."""
    rss = [s["rss_mb"] for s in samples if s["t_s"] >= warmup_s]
    if len(rss) < 3:
        return None
    third = len(rss) // 3
    return round(float(np.median(rss[-third:]) - np.median(rss[:third])), 2)


# -- traffic ------------------------------------------------------------------------------------------
def upload_images(seed: int) -> dict[str, bytes]:
    """Uploads, made once: small PNGs (a ramp with noise) each with an OpenAI-style mask (a transparent
    square), and a 12-megapixel JPEG as a phone sends, with an opaque mask (white = repaint)."""
    rng = np.random.default_rng(seed)
    out = {}
    for side in (48, 64, 160):
        ramp = np.linspace(0, 255, side)[None, :, None] * np.ones((side, 1, 3))
        pixels = np.clip(ramp + rng.normal(0, 30, (side, side, 3)), 0, 255).astype(np.uint8)
        out[f"image{side}"] = encode(Image.fromarray(pixels), "PNG")
        alpha = np.full((side, side), 255, np.uint8)
        alpha[side // 4: 3 * side // 4, side // 4: 3 * side // 4] = 0
        out[f"mask{side}"] = encode(Image.fromarray(np.dstack([pixels, alpha]), "RGBA"), "PNG")
    w, h = PHOTO
    small = rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)
    out["imagephoto"] = encode(Image.fromarray(small).resize(PHOTO, Image.BILINEAR), "JPEG")
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    out["maskphoto"] = encode(Image.fromarray(mask), "PNG")
    return out


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def sse_events(lines: list[str]) -> list[tuple[str, dict]]:
    """(event, data) pairs from server-sent-event lines seen so far (comments and pings skipped)."""
    out, event = [], None
    for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:") and event:
            out.append((event, json.loads(line[5:])))
            event = None
    return out


class Client:
    """One closed-loop client: draws an action, runs it to its end, records what came back."""

    def __init__(self, index: int, cfg: SoakConfig, http: httpx.AsyncClient, ledger: Ledger,
                 images: dict[str, bytes]) -> None:
        self.index, self.http, self.ledger, self.images = index, http, ledger, images
        self.rng = random.Random(f"{cfg.seed}-{index}")
        self.key = index % len(KEYS)
        self.recent: collections.deque[str] = collections.deque(maxlen=20)
        self.labels = 0

    def auth(self, key: int | None = None) -> dict:
        return {"Authorization": f"Bearer {KEYS[self.key if key is None else key]}"}

    def new_label(self) -> str:
        self.labels += 1
        return f"soak-{self.index}-{self.labels}"

    async def run(self, deadline: float) -> None:
        names, weights = list(ACTIONS), list(ACTIONS.values())
        while time.monotonic() < deadline:
            action = self.rng.choices(names, weights)[0]
            try:
                await getattr(self, action)()
            except httpx.TransportError as e:  # a reply that never came
                self.ledger.faults[f"{action}: {type(e).__name__}"] += 1
                self.ledger.transport_errors += 1
            except (ValueError, KeyError) as e:  # a reply not shaped as documented: noted, the soak goes on
                self.ledger.faults[f"{action}: unexpected reply ({type(e).__name__}: {e})"[:160]] += 1
            await asyncio.sleep(self.rng.uniform(0, 0.2))

    # -- request bodies ---------------------------------------------------------------------------
    def job_body(self, steps: tuple[int, int]) -> dict:
        body = {"prompt": f"the digit {self.rng.randrange(10)}", "num_inference_steps": self.rng.randint(*steps),
                "seed": self.rng.randrange(2**31)}
        if self.rng.random() < 0.4:
            body["size"] = "64x64"  # else the model's 32x32
        if self.rng.random() < 0.25:
            body["n"] = 2
        return body

    def edit_form(self, steps: tuple[int, int]) -> tuple[dict, dict]:
        """(fields, files) of an edit at 64x64 (the embedded model's 32x32 is below min_side)."""
        side = self.rng.choice((48, 64, 160, 160, "photo"))
        kind = "image/jpeg" if side == "photo" else "image/png"
        files = {"image": (f"image.{kind[6:]}", self.images[f"image{side}"], kind)}
        if self.rng.random() < 0.5:
            files["mask"] = ("mask.png", self.images[f"mask{side}"], "image/png")
        fields = {"prompt": f"the digit {self.rng.randrange(10)}", "size": "64x64",
                  "num_inference_steps": str(self.rng.randint(*steps)), "strength": self.rng.choice(("0.5", "1.0")),
                  "seed": str(self.rng.randrange(2**31))}
        return fields, files

    def post_args(self, steps: tuple[int, int], stream: bool = False) -> tuple[str, dict]:
        """(path, httpx keyword arguments) of a generation or (2 in 5) an edit."""
        if self.rng.random() < 0.4:
            fields, files = self.edit_form(steps)
            return EDIT, {"data": {**fields, "stream": str(stream).lower(), "stream_format": "vqdm"}, "files": files}
        return GEN, {"json": {**self.job_body(steps), "stream": stream, "stream_format": "vqdm"}}

    # -- actions ----------------------------------------------------------------------------------
    async def post(self, path: str, headers: dict | None = None, **kw) -> httpx.Response:
        self.ledger.posts_sent += 1
        r = await self.http.post(path, headers={**self.auth(), **(headers or {})}, **kw)
        self.answered(path, r.status_code)
        if r.status_code == 200:
            self.admitted(r.json()["id"])
        return r

    def answered(self, path: str, status: int) -> None:
        self.ledger.reply("POST", path, status)
        self.ledger.post_status[status] += 1

    def admitted(self, ref: str) -> None:
        self.ledger.jobs.append((self.key, ref))
        self.recent.append(ref)

    async def generate(self) -> None:
        await self.post(GEN, json=self.job_body((2, 6)))

    async def edit(self) -> None:
        fields, files = self.edit_form((4, 8))
        await self.post(EDIT, data=fields, files=files)

    async def stream(self, cancel: bool = False) -> None:
        """A streamed generation or edit, read to its one final event; `cancel`: DELETE it by id meanwhile."""
        path, kw = self.post_args((10, 30) if cancel else (2, 6), stream=True)
        self.ledger.posts_sent += 1
        lines, deleted = [], None
        async with self.http.stream("POST", path, headers=self.auth(), **kw) as r:
            if r.status_code != 200:
                await r.aread()
                return self.answered(path, r.status_code)
            async for line in r.aiter_lines():
                lines.append(line)
                if cancel and deleted is None and not line and sse_events(lines):  # the queued event is in
                    await asyncio.sleep(self.rng.uniform(0, 1.0))
                    deleted = await self.delete(sse_events(lines)[0][1]["id"])
        self.stream_ended(path, sse_events(lines), deleted)

    def stream_ended(self, path: str, events: list[tuple[str, dict]], deleted: int | None) -> None:
        errors = [d for e, d in events if e == "error"]
        images = sorted(d["index"] for e, d in events if e.endswith(".completed"))
        if not (len(errors) == 1 and not images) and not (not errors and images == list(range(len(images))) != []):
            self.ledger.faults["stream without exactly one final reply"] += 1
            return self.answered(path, "no final event")
        status = errors[0]["status"] if errors else 200
        self.answered(path, status)
        self.admitted(events[0][1]["id"])
        if deleted is not None:
            self.check_cancel(deleted, status)

    def check_cancel(self, deleted: int, status: int) -> None:
        """A DELETE that found the job unfinished (200/202) must end it 499; one too late (409), 200."""
        if {200: 499, 202: 499, 409: 200}.get(deleted) != status:
            self.ledger.faults[f"DELETE {deleted} but the request got {status}"] += 1

    async def delete(self, ref: str) -> int:
        r = await self.http.delete(f"/v1/requests/{ref}", headers=self.auth())
        self.ledger.reply("DELETE", "/v1/requests/x", r.status_code)
        if r.status_code not in (200, 202, 409):
            self.ledger.faults[f"DELETE answered {r.status_code}"] += 1
        return r.status_code

    async def status(self, ref: str, key: int | None = None) -> httpx.Response:
        r = await self.http.get(f"/v1/requests/{ref}", headers=self.auth(key))
        self.ledger.reply("GET", "/v1/requests/x", r.status_code)
        return r

    async def cancel_by_id(self) -> None:
        await self.stream(cancel=True)

    async def cancel_by_label(self) -> None:
        """POST with an X-Request-Id label; once the label is visible, DELETE by the label."""
        label = self.new_label()
        path, kw = self.post_args((10, 30))
        posting = asyncio.create_task(self.http.post(path, headers={**self.auth(), "X-Request-Id": label}, **kw))
        self.ledger.posts_sent += 1
        deleted = None
        while not posting.done() and deleted is None:
            if (await self.status(label)).status_code == 200:
                await asyncio.sleep(self.rng.uniform(0, 1.0))
                deleted = await self.delete(label)
            else:
                await asyncio.sleep(0.05)
        r = await posting
        self.answered(path, r.status_code)
        if r.status_code in (200, 499):
            self.admitted(label)
        if deleted is not None:
            self.check_cancel(deleted, r.status_code)

    async def disconnect(self) -> None:
        """Walk away from a labelled request (read timeout, or a stream closed after its first event),
        then read its outcome by label: the status the server answered into the closed connection."""
        label = self.new_label()
        headers = {**self.auth(), "X-Request-Id": label}
        stream = self.rng.random() < 0.5
        path, kw = self.post_args((10, 30), stream=stream)
        self.ledger.posts_sent += 1
        try:
            if stream:
                async with self.http.stream("POST", path, headers=headers, **kw) as r:
                    if r.status_code != 200:
                        await r.aread()
                        return self.answered(path, r.status_code)
                    async for _ in r.aiter_lines():
                        break  # the first line of the queued event: the job is in; close
            else:
                timeout = httpx.Timeout(60, read=self.rng.uniform(0.3, 2.0))
                r = await self.http.post(path, headers=headers, timeout=timeout, **kw)
                self.answered(path, r.status_code)
                if r.status_code == 200:
                    self.admitted(label)
                return
        except httpx.ReadTimeout:
            pass
        self.ledger.reply("POST", path, "walked away")
        await self.outcome(label)

    async def outcome(self, label: str) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r = await self.status(label)
            if r.status_code == 200 and r.json()["state"] in ("succeeded", "failed", "cancelled"):
                self.ledger.walked_away[job_status(r.json())] += 1
                return self.admitted(label)
            await asyncio.sleep(0.1)
        self.ledger.walked_away["no outcome"] += 1

    async def poll(self) -> None:
        """Status of a recent job: its own key sees it (or 404 once forgotten), the other key never."""
        if not self.recent:
            return
        ref = self.rng.choice(list(self.recent))
        own = await self.status(ref)
        if own.status_code not in (200, 404):
            self.ledger.faults[f"status poll answered {own.status_code}"] += 1
        other = await self.status(ref, key=(self.key + 1) % len(KEYS))
        if other.status_code != 404:
            self.ledger.faults[f"another key's job answered {other.status_code}"] += 1


# -- the run ------------------------------------------------------------------------------------------
async def take_sample(server: SoakServer, probe: httpx.AsyncClient, ledger: Ledger, t0: float) -> dict:
    metrics = await server.scrape(probe)
    return {"t_s": round(time.monotonic() - t0, 1), **server.proc_figures(), "queue_depth": metrics["queue_depth"],
            "lag_buckets": metrics["lag_buckets"], "server_posts": metrics["requests"], "replies": dict(ledger.replies)}


async def sampler(server: SoakServer, probe: httpx.AsyncClient, ledger: Ledger, cfg: SoakConfig, t0: float,
                  samples: list[dict], stop: asyncio.Event) -> None:
    """A sample at t0, t0 + sample_s, ... until `stop`."""
    while True:
        samples.append(await take_sample(server, probe, ledger, t0))
        previous = samples[-2]["lag_buckets"] if len(samples) > 1 else {}
        samples[-1]["lag_p99_s"] = histogram_quantile(0.99, bucket_delta(samples[-1]["lag_buckets"], previous))
        next_tick = t0 + cfg.sample_s * len(samples)
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, next_tick - time.monotonic()))
            return
        except asyncio.TimeoutError:
            pass


async def settle(server: SoakServer, probe: httpx.AsyncClient, before: dict, sent: int, timeout: float = 180) -> dict:
    """/metrics once the server has counted as many POSTs as were sent (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        now = await server.scrape(probe)
        counted = sum(now["requests"].values()) - sum(before["requests"].values())
        if counted >= sent or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.5)


async def fds_settled(server: SoakServer, before: int, timeout: float = 30) -> int:
    """Open fds once the server has closed the finished connections (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while (fds := server.proc_figures()["fds"]) > before and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    return fds


async def still_remembered(server: SoakServer, probe: httpx.AsyncClient, jobs: list[tuple[int, str]],
                           retention_s: float) -> int:
    """How many of the jobs still answer GET /v1/requests/{id} once the retention time has passed since
    the last one ended (every job has ended by now); retried for 30 s against timers firing late."""
    await asyncio.sleep(retention_s)  # the retention clock itself: nothing to poll for until it has run
    left = list(dict.fromkeys(jobs))
    deadline = time.monotonic() + 30
    while left and time.monotonic() < deadline:
        seen = [(k, ref) for k, ref in left if (await probe.get(
            f"{server.base}/v1/requests/{ref}", headers={"Authorization": f"Bearer {KEYS[k]}"})).status_code != 404]
        left = seen
        if left:
            await asyncio.sleep(1.0)
    return len(left)


async def soak(cfg: SoakConfig, server: SoakServer) -> dict:
    ledger, images = Ledger(), upload_images(cfg.seed)
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(keepalive_expiry=KEEPALIVE_S)) as probe:
        before = await server.scrape(probe)
        start = server.proc_figures()
        t0, samples, stop = time.monotonic(), [], asyncio.Event()
        sampling = asyncio.create_task(sampler(server, probe, ledger, cfg, t0, samples, stop))
        limits = httpx.Limits(max_connections=4 * cfg.clients, keepalive_expiry=KEEPALIVE_S)
        async with httpx.AsyncClient(base_url=server.base, timeout=300, limits=limits) as http:
            clients = [Client(i, cfg, http, ledger, images) for i in range(cfg.clients)]
            await asyncio.gather(*(c.run(t0 + cfg.duration_s) for c in clients))
        traffic_s = time.monotonic() - t0
        stop.set()
        await sampling
        after = await settle(server, probe, before, ledger.posts_sent)
        fds_after = await fds_settled(server, start["fds"])
        remembered = await still_remembered(server, probe, ledger.jobs, cfg.retention_s)
        end = await take_sample(server, probe, ledger, t0)
    run = {"before": before, "after": after, "start": start, "end": end, "fds_after": fds_after,
           "remembered": remembered, "traffic_s": traffic_s}
    return {"summary": summarize(cfg, samples, ledger, run), "samples": samples}


def summarize(cfg: SoakConfig, samples: list[dict], ledger: Ledger, run: dict) -> dict:
    before, after = run["before"]["requests"], run["after"]["requests"]
    server = {s: n - before.get(s, 0) for s, n in after.items() if n - before.get(s, 0)}
    expected = collections.Counter({str(k): v for k, v in (ledger.post_status + ledger.walked_away).items()})
    lag = bucket_delta(run["after"]["lag_buckets"], run["before"]["lag_buckets"])
    late = lag.get("+Inf", 0) - max((n for le, n in lag.items() if le != "+Inf" and float(le) <= LATE_S), default=0)
    steady = [s for s in samples if s["t_s"] >= cfg.warmup] or samples[-1:]
    counted = sum(server.values())
    return {
        "traffic_s": round(run["traffic_s"], 1), "posts_sent": ledger.posts_sent, "replies": dict(ledger.replies),
        "server_replies_by_status": server, "client_replies_by_status": dict(expected),
        "replies_match": dict(expected) == server, "walked_away": {str(k): v for k, v in ledger.walked_away.items()},
        "lost_jobs": abs(ledger.posts_sent - counted) + ledger.transport_errors + ledger.walked_away["no outcome"],
        "faults": dict(ledger.faults), "status_5xx": sum(n for s, n in server.items() if s.startswith("5")),
        "jobs": len(ledger.jobs), "jobs_remembered_after_retention": run["remembered"],
        "rss_mb": {"start": run["start"]["rss_mb"], "after_warmup": steady[0]["rss_mb"],
                   "max": max(s["rss_mb"] for s in samples), "end_of_traffic": samples[-1]["rss_mb"],
                   "after_retention": run["end"]["rss_mb"]},
        "rss_median_growth_mb": rss_median_growth_mb(samples, cfg.warmup),
        "rss_slope_mb_per_h": rss_slope_mb_per_h(samples, cfg.warmup),
        "fds": {"before": run["start"]["fds"], "after": run["fds_after"],
                "growth": run["fds_after"] - run["start"]["fds"]},
        "threads": {"before": run["start"]["threads"], "after": run["end"]["threads"]},
        "lag_s": {"p50": histogram_quantile(0.5, lag), "p99": histogram_quantile(0.99, lag),
                  "ticks": int(lag.get("+Inf", 0)), f"over_{LATE_S}s": int(late)},
    }


def markdown(result: dict) -> str:
    """The README table."""
    s, c = result["summary"], result["config"]
    theil_sen = rss_theil_sen_slope_mb_per_h(result["samples"], c["warmup_s"])  # from the samples: older files too
    status = ", ".join(f"{n}×{k}" for k, n in sorted(s["server_replies_by_status"].items()))
    rows = [("traffic", f"{s['traffic_s'] / 60:.1f} min, {c['clients']} clients, 2 keys, {s['posts_sent']} POSTs "
                        f"({s['jobs']} jobs), seed {c['seed']}"),
            ("replies by status (server)", status),
            ("lost jobs", f"{s['lost_jobs']} (replies match the client's: {'yes' if s['replies_match'] else 'NO'})"),
            ("jobs still held after the retention", f"{s['jobs_remembered_after_retention']} of {s['jobs']}"),
            ("RSS slope after warm-up", f"{theil_sen:+.1f} MB/h (Theil–Sen; least squares {s['rss_slope_mb_per_h']:+.1f} "
                                        f"MB/h), {s['rss_mb']['after_warmup']:.0f} → {s['rss_mb']['end_of_traffic']:.0f} "
                                        f"MB, median {s['rss_median_growth_mb']:+.0f} MB, "
                                        f"{s['rss_mb']['after_retention']:.0f} MB after the retention"),
            ("open fds", f"{s['fds']['before']} → {s['fds']['after']} ({s['fds']['growth']:+d})"),
            ("event-loop lag p50 / p99", f"{s['lag_s']['p50'] * 1000:.1f} / {s['lag_s']['p99'] * 1000:.1f} ms "
                                         f"({s['lag_s'][f'over_{LATE_S}s']} of {s['lag_s']['ticks']} ticks over "
                                         f"{LATE_S * 1000:.0f} ms)")]
    return "\n".join(["| soak figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SoakConfig()
    for name in ("duration_s", "sample_s", "warmup_s", "retention_s", "clients", "seed", "device", "startup_timeout_s"):
        kind = type(getattr(defaults, name)) if getattr(defaults, name) is not None else float
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name))
    p.add_argument("--out", default="benchmarks/results/soak.json")
    p.add_argument("--server-log", help="where the server's log goes (default: a new temporary folder)")
    p.add_argument("--table", metavar="JSON", help="print the Markdown table of an earlier run and exit")
    args = p.parse_args()
    if args.table:
        return print(markdown(json.loads(Path(args.table).read_text())))
    cfg = SoakConfig(**{k: v for k, v in vars(args).items() if k not in ("out", "table", "server_log")})
    log = Path(args.server_log or Path(tempfile.mkdtemp(prefix="vqdm-soak-")) / "server.log")
    server = SoakServer(cfg, log)
    try:
        out = asyncio.run(soak(cfg, server))
    finally:
        server.stop()
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(cfg.device),
              "config": {**asdict(cfg), "warmup_s": cfg.warmup, "model": "embedded default (vqdm-tiny-sdxl)"},
              **out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"wrote {args.out} (server log: {log})")


if __name__ == "__main__":
    main()
