"""The runner: same seed → same image whether batched or alone, a member cancelled mid-run
leaves its batch mates' images unchanged (with the batch shrunk where the sampler allows), and
partial images go only to the member that asked for them."""
from __future__ import annotations

import numpy as np
import pytest

from vqdm.server.jobs import GenerationParams
from vqdm.server.runner import Member, run_batch


def params(model, seed, n=1, steps=3, scheduler="euler", guidance=5.0, prompt=None, partial_images=0):
    return GenerationParams(model=model, prompt=prompt or f"prompt {seed}", negative_prompt=None, n=n, width=64,
                            height=64, steps=steps, guidance=guidance, scheduler=scheduler, seed=seed,
                            partial_images=partial_images)


def pixels(images):
    return [np.asarray(im).astype(np.int16) for im in images]


def solo(replica, p):
    """Each seed of `p` alone, as n=1 runs."""
    out = []
    for s in p.seeds:
        one = GenerationParams(**{**p.__dict__, "seed": s, "n": 1})
        out += pixels(run_batch(replica, [Member(one)]).images[0])
    return out


def rows_per_unet_call(replica):
    seen = []
    handle = replica.pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    return seen, handle


@pytest.mark.parametrize("model,scheduler,guidance", [("tiny", "euler", 5.0), ("turbo", "euler_a", 0.0)])
def test_batched_equals_solo(served_models, model, scheduler, guidance):
    replica = {m.id: m for m in served_models}[model].replicas["cpu"]
    ps = [params(model, 1, scheduler=scheduler, guidance=guidance),
          params(model, 2, n=2, scheduler=scheduler, guidance=guidance),
          params(model, 7, scheduler=scheduler, guidance=guidance)]
    out = run_batch(replica, [Member(p) for p in ps])
    assert out.rows == 4 and len(out.step_seconds) == 3
    for p, images in zip(ps, out.images):
        for got, want in zip(pixels(images), solo(replica, p)):
            assert np.abs(got - want).max() <= 1  # batched GEMMs may round one level differently
    a, b = pixels(out.images[0])[0], pixels(out.images[2])[0]
    assert np.abs(a - b).max() > 20  # and different seeds really differ


@pytest.mark.parametrize("model,scheduler,guidance,shrinks", [
    ("tiny", "euler", 5.0, True), ("turbo", "euler_a", 0.0, True), ("tiny", "dpmpp_2m", 5.0, False)])
def test_cancelled_member_leaves_mates_intact(served_models, model, scheduler, guidance, shrinks):
    replica = {m.id: m for m in served_models}[model].replicas["cpu"]
    steps = 5
    ps = [params(model, s, n=n, steps=steps, scheduler=scheduler, guidance=guidance) for s, n in ((3, 1), (4, 2), (9, 1))]
    flag = {"cancel": False}

    def on_step(step, total):
        if step == 1:
            flag["cancel"] = True  # member 1 is cancelled during step 2; noticed when step 2 ends

    members = [Member(ps[0], on_step=on_step), Member(ps[1], is_cancelled=lambda: flag["cancel"]), Member(ps[2])]
    seen, handle = rows_per_unet_call(replica)
    try:
        out = run_batch(replica, members)
    finally:
        handle.remove()
    cfg = 2 if guidance > 1 else 1
    assert seen[:2] == [4 * cfg, 4 * cfg]
    assert seen[2:] == ([2 * cfg] * (steps - 2) if shrinks else [4 * cfg] * (steps - 2))
    assert out.images[1] is None and out.cancelled_at_step == [None, 2, None]
    for mi in (0, 2):
        (got,) = pixels(out.images[mi])
        (want,) = solo(replica, ps[mi])
        assert np.abs(got - want).max() <= 1


def test_all_cancelled_interrupts_the_pipeline(served_models):
    replica = served_models[0].replicas["cpu"]
    state = {"steps": 0}

    def on_step(step, total):
        state["steps"] = step

    seen, handle = rows_per_unet_call(replica)
    try:
        out = run_batch(replica, [Member(params("tiny", 1, steps=20), is_cancelled=lambda: state["steps"] >= 2,
                                         on_step=on_step)])
    finally:
        handle.remove()
    assert out.images == [None] and out.cancelled_at_step == [3] and len(seen) == 3
    assert out.vae_decode_s < 0.05  # nothing decoded


def test_incompatible_members_are_refused(served_models):
    replica = served_models[0].replicas["cpu"]
    with pytest.raises(ValueError, match="share size"):
        run_batch(replica, [Member(params("tiny", 1)), Member(params("tiny", 2, steps=4))])


@pytest.fixture
def one_thread():
    """Tiny tensors on a shared 2-core machine: a second torch thread only spin-waits against other processes."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_partial_images_only_for_the_member_that_asked(served_models, one_thread):
    """Batch [cancelled at step 2, two images with 2 partials each, no partials]: previews come after
    steps 1 and 3, around the batch shrinking, each from the asking member's own rows (equal to that
    seed's previews run alone); the others get none, and their images are the ones made without."""
    replica = served_models[0].replicas["cpu"]
    got: dict[str, list] = {"asked": [], "other": []}

    def record(who, into=None):
        return lambda i, k, image: (into if into is not None else got[who]).append(
            (i, k, np.asarray(image).astype(np.int16)))

    flag = {"cancel": False}
    gone, asked, other = (params("tiny", 20, steps=4), params("tiny", 21, n=2, steps=4, partial_images=2),
                          params("tiny", 23, steps=4))
    out = run_batch(replica, [
        Member(gone, is_cancelled=lambda: flag["cancel"], on_step=lambda s, t: flag.update(cancel=s >= 1)),
        Member(asked, on_preview=record("asked")), Member(other, on_preview=record("other"))])
    assert out.cancelled_at_step == [2, None, None] and out.images[0] is None
    assert got["other"] == [] and [(i, k) for i, k, _ in got["asked"]] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert all(image.shape == (64, 64, 3) for _, _, image in got["asked"])
    for s, image in enumerate(pixels(out.images[1])):
        alone = []
        one = GenerationParams(**{**asked.__dict__, "seed": asked.seed + s, "n": 1})
        (want,) = pixels(run_batch(replica, [Member(one, on_preview=record(None, alone))]).images[0])
        assert np.abs(image - want).max() <= 1
        previews = [im for i, _, im in got["asked"] if i == s]
        assert [k for _, k, _ in alone] == [0, 1] and all(np.abs(a - b).max() <= 2 for a, (_, _, b) in
                                                          zip(previews, alone))
    assert np.abs(got["asked"][0][2] - got["asked"][1][2]).max() > 10  # the two seeds' previews differ
    (image,) = pixels(out.images[2])
    assert np.abs(image - solo(replica, other)[0]).max() <= 1


def test_a_job_publishes_each_preview_once_and_only_while_running():
    """A job retried alone after an out-of-memory batch makes its previews again: its stream gets each once."""
    from vqdm.server.jobs import Job, JobState

    job = Job("j", params("tiny", 1, partial_images=2))
    job.add_preview(0, 0, "queued: too early")
    job.mark_running(1)
    for k, image in ((0, "a"), (1, "b"), (0, "a, retried"), (1, "b, retried")):
        job.add_preview(0, k, image)
    events = [job.events.get_nowait() for _ in range(job.events.qsize())]
    assert [(kind, data.get("partial_image_index"), data.get("image")) for kind, data in events] == [
        ("started", None, None), ("partial_image", 0, "a"), ("partial_image", 1, "b")]
    assert job.latest_preview == "b"
    job.finish(JobState.CANCELLED)
    assert job.latest_preview is None
