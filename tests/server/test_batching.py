"""The runner: same seed → same image whether batched or alone, and a member cancelled mid-run
leaves its batch mates' images unchanged (with the batch shrunk where the sampler allows)."""
from __future__ import annotations

import numpy as np
import pytest

from vqdm.server.jobs import GenerationParams
from vqdm.server.runner import Member, run_batch


def params(model, seed, n=1, steps=3, scheduler="euler", guidance=5.0, prompt=None):
    return GenerationParams(model=model, prompt=prompt or f"prompt {seed}", negative_prompt=None, n=n, width=64,
                            height=64, steps=steps, guidance=guidance, scheduler=scheduler, seed=seed)


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
