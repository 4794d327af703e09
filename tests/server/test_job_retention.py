"""Bounded memory in the job queue and registry: however a job ends (succeeded, failed, cancelled
while queued or running, shutdown, evicted by an unhealthy device) it drops its edit input at once
and is forgotten `job_retention_s` later; the edits waiting hold at most `max_queued_edit_pixels`.

The queued endings run a dispatcher with no worker started, so a submitted job stays queued until
the test ends it one of the ways the server does; the worker endings run the tiny model (or, for a
failure, a model the dispatcher does not serve)."""
from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import numpy as np
import pytest

RETENTION_S = 0.05
DEADLINE_S = 30.0  # generous: the machine is shared; each wait polls for its event


async def until(predicate, what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def dispatcher(retention_s: float = RETENTION_S, **settings):
    from vqdm.server.batching import Dispatcher
    from vqdm.server.metrics import Metrics
    from vqdm.server.settings import Settings

    d = Dispatcher(Settings(devices=["cpu"], job_retention_s=retention_s, **settings), Metrics(), ["cpu"])
    d.accepting = True  # no worker started: submitted jobs stay queued
    return d


def edit_job(job_id: str, model: str = "tiny", side: int = 64, steps: int = 2):
    """(an edit job, a weak reference to its input image); nothing else holds the image."""
    from PIL import Image

    from vqdm.server.edit_pipeline import EditInput
    from vqdm.server.jobs import GenerationParams, Job

    image = Image.new("RGB", (side, side), (90, 120, 200))
    params = GenerationParams(model=model, prompt="a red door", negative_prompt=None, n=1, width=side, height=side,
                              steps=steps, guidance=5.0, scheduler="euler", seed=0,
                              edit=EditInput(image=image, mask=None, strength=1.0))
    return Job(job_id, params, label=f"label-{job_id}"), weakref.ref(image)


async def forgotten(d, job) -> None:
    await until(lambda: d.jobs.find(job.id, None) is None and d.jobs.labelled(None, job.label) is None,
                f"job {job.id} to be forgotten after {RETENTION_S}s")
    assert len(d.jobs) == 0


async def released_while_remembered(d, job, image_ref) -> None:
    """A job ended by a worker: its input goes as soon as the batch lets go of it (the device thread
    unwinds), long before the registry forgets the job."""
    await until(lambda: image_ref() is None, f"job {job.id}'s edit input to be released")
    assert d.jobs.find(job.id, None) is job


@pytest.mark.parametrize("ending", ["deleted while queued", "timeout while queued", "shutdown", "device unhealthy"])
def test_a_queued_job_is_released_and_forgotten_however_it_ends(ending):
    from vqdm.server.jobs import JobState

    async def run():
        d = dispatcher()
        job, image_ref = edit_job("j1")
        d.submit(job)
        if ending == "deleted while queued":
            d.cancel(job, "deleted")
        elif ending == "timeout while queued":
            d.cancel(job, "timeout")
        elif ending == "shutdown":
            await d.drain(0)  # the drain deadline answers what is left
        else:
            d.failures.mark_unhealthy("cpu", "test: device declared stuck")
        want = JobState.FAILED if ending == "device unhealthy" else JobState.CANCELLED
        assert job.state is want and len(d.pending) == 0
        assert image_ref() is None, "a finished job still holds its edit input"
        await forgotten(d, job)

    asyncio.run(run())


def test_a_job_failed_by_the_worker_releases_its_input():
    """A batch that fails outside the pipeline (here: a model the dispatcher does not serve) ends
    its jobs through the failure policy."""
    from vqdm.server import failures
    from vqdm.server.jobs import JobState

    async def run():
        d = dispatcher(retention_s=600)
        d.install({})
        d.start()
        job, image_ref = edit_job("j1", model="not-served")
        d.submit(job)
        await asyncio.wait_for(job.done.wait(), DEADLINE_S)
        assert job.state is JobState.FAILED and job.error == failures.INTERNAL_ERROR
        await released_while_remembered(d, job, image_ref)
        await d.shutdown(0)

    asyncio.run(run())


def test_succeeded_and_cancelled_running_edits_release_their_input(served_models):
    from vqdm.server.jobs import JobState

    async def run():
        d = dispatcher(retention_s=600)
        d.install({m.id: m for m in served_models})
        d.start()
        done, done_ref = edit_job("done")
        d.submit(done)
        await asyncio.wait_for(done.done.wait(), DEADLINE_S)
        assert done.state is JobState.SUCCEEDED and len(done.result.images) == 1
        await released_while_remembered(d, done, done_ref)

        stopped, stopped_ref = edit_job("stopped", steps=150)
        d.submit(stopped)
        await until(lambda: stopped.step >= 1, "the long edit to run a step")
        d.cancel(stopped, "deleted")
        await asyncio.wait_for(stopped.done.wait(), DEADLINE_S)
        assert stopped.state is JobState.CANCELLED and stopped.cancel_stage == "running"
        await released_while_remembered(d, stopped, stopped_ref)
        await d.shutdown(0)

    asyncio.run(run())


def test_the_registry_does_not_grow_under_a_cancel_flood():
    async def run():
        d = dispatcher()
        image_refs, job_refs = [], []
        for i in range(500):
            job, image_ref = edit_job(f"j{i}")
            d.submit(job)
            d.cancel(job, "client_disconnected")
            image_refs.append(image_ref)
            job_refs.append(weakref.ref(job))
            if i % 50 == 0:
                await asyncio.sleep(0)  # let the loop run, as between requests
        del job
        await until(lambda: len(d.jobs) == 0, "the registry to empty after the flood")
        assert all(r() is None for r in image_refs), "cancelled jobs still hold their edit input"
        gc.collect()
        assert all(r() is None for r in job_refs), "forgotten jobs are still referenced"

    asyncio.run(run())


def test_queued_edit_pixels_are_bounded(make_client):
    """Over `max_queued_edit_pixels`, an edit gets 429 with Retry-After like a full queue; a
    generation is not affected, and the room comes back when the waiting edit goes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    # An idle worker waits batch_wait_ms for batch mates: the first edit waits in the queue meanwhile.
    c = make_client(max_pixels=64 * 64, max_queued_edit_pixels=64 * 64 + 100, batch_wait_ms=60_000)

    def edit(label: str):
        return c.post("/v1/images/edits", files={"image": ("s.png", png, "image/png")}, headers={"X-Request-Id": label},
                      data={"prompt": "a red door", "size": "64x64", "num_inference_steps": "2"})

    def queued(label: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while (r := c.get(f"/v1/requests/{label}")).status_code != 200 or r.json()["state"] != "queued":
            assert time.monotonic() < deadline, f"{label} never queued"
            time.sleep(0.02)

    first: dict = {}
    t = threading.Thread(target=lambda: first.setdefault("r", edit("first")))
    t.start()
    queued("first")
    r = edit("second")
    assert r.status_code == 429, r.text[:300]
    err = r.json()["error"]
    assert err["code"] == "queue_full" and "max_queued_edit_pixels" in err["message"], err
    assert int(r.headers["retry-after"]) >= 1
    assert c.delete("/v1/requests/first").status_code == 200
    t.join(DEADLINE_S)
    assert first["r"].status_code == 499

    third: dict = {}
    t = threading.Thread(target=lambda: third.setdefault("r", edit("third")))
    t.start()
    queued("third")  # admitted: the cancelled edit no longer counts
    assert c.delete("/v1/requests/third").status_code == 200
    t.join(DEADLINE_S)
    assert third["r"].status_code == 499


def test_max_queued_edit_pixels_must_admit_the_largest_edit():
    from pydantic import ValidationError

    from vqdm.server.settings import Settings

    assert Settings(max_pixels=8192 * 8192).max_queued_edit_pixels == 8192 * 8192
    with pytest.raises(ValidationError, match="max_queued_edit_pixels"):
        Settings(max_pixels=1024 * 1024, max_queued_edit_pixels=512 * 512)
