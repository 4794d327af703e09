"""Checkpoint and resume: an interrupted run, resumed, gives bit for bit the uninterrupted artifact."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from vqdm.cli import main
from vqdm.models.artifact import MANIFEST_FILE, WEIGHTS_FILE
from vqdm.quantizer.checkpoint import CheckpointError
from vqdm.quantizer.quantize.checkpoint import QuantizeCheckpoint
from vqdm.quantizer.quantize.run import QuantizeStopped, quantize_model
from vqdm.quantizer.recipes import recipe

# The settings of the shared `sdxl_run` (conftest `tiny_args`), as library arguments.
CALIB = dict(num_prompts=2, steps=2, resolution=64, batch_size=2)
AQ = {"beam_size": 2, "adam_steps": 2, "max_rounds": 1, "kmeans_iters": 5, "damping": 0.1, "init_passes": 1,
      "relative_tolerance": 0.01}


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _run(model, out, **kwargs):
    return quantize_model(model, "sdxl", 3, out, calibration=recipe("sdxl").replace(**CALIB), aq_options=AQ,
                          progress=False, **kwargs)


def test_interrupted_then_resumed_equals_uninterrupted(sdxl_run, tiny_sdxl_dir, tmp_path):
    out = tmp_path / "resumed"
    with pytest.raises(QuantizeStopped, match="--resume"):
        _run(tiny_sdxl_dir, out, stop_after_subset=2)
    ckpt = QuantizeCheckpoint.dir_for(out)
    assert not out.exists()  # nothing that looks like a finished artifact
    assert sorted(p.suffix for p in ckpt.iterdir()) == [".json", ".safetensors", ".safetensors", ".safetensors"]
    state = json.loads((ckpt / "state.json").read_text())
    assert [e["subset"] for e in state["finished"]] == ["down_blocks.0", "down_blocks.1", "down_blocks.2"]

    # Resume through the CLI, as a user would after a crash; a fresh process state is not needed
    # for equality because every draw is seeded from (seed, prompt) or (seed, layer).
    torch.manual_seed(12345)  # a disturbed global RNG must not matter either
    assert main(["quantize", *sdxl_run.args, "--out", str(out), "--resume"]) == 0
    assert not ckpt.exists()
    a, b = _tensors(sdxl_run.out / WEIGHTS_FILE), _tensors(out / WEIGHTS_FILE)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = {e["name"]: e["rel_error"] for e in json.loads((sdxl_run.out / MANIFEST_FILE).read_text())["layers"]}
    lb = {e["name"]: e["rel_error"] for e in json.loads((out / MANIFEST_FILE).read_text())["layers"]}
    assert la == lb


def test_memory_bounded_passes_and_resume_checks(sdxl_run, tiny_sdxl_dir, tmp_path):
    """H in several passes equals H in one; a resume with other settings, or without --resume, is refused."""
    out = tmp_path / "passes"
    with pytest.raises(QuantizeStopped):
        _run(tiny_sdxl_dir, out, stop_after_subset=0, max_stats_bytes=8 * 288 * 288)  # one conv H per pass
    ckpt = QuantizeCheckpoint.dir_for(out)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["finished"][0]["info"]["passes"] == 5
    ref = _tensors(sdxl_run.out / WEIGHTS_FILE)
    got = _tensors(ckpt / state["finished"][0]["file"])
    for name in state["finished"][0]["layers"]:
        assert torch.equal(got[f"{name}.codes"], ref[f"{name}.codes"]), name
        assert torch.equal(got[f"{name}.codebooks"].half(), ref[f"{name}.codebooks"]), name

    with pytest.raises(CheckpointError, match="steps"):
        quantize_model(tiny_sdxl_dir, "sdxl", 3, out, calibration=recipe("sdxl").replace(**{**CALIB, "steps": 3}),
                       aq_options=AQ, max_stats_bytes=8 * 288 * 288, resume=True, progress=False)
    with pytest.raises(Exception, match="--resume to continue"):
        _run(tiny_sdxl_dir, out)
    assert ckpt.exists() and not out.exists()


def test_checkpoint_rejects_a_corrupt_state(tiny_sdxl_dir, tmp_path):
    out = tmp_path / "corrupt"
    ckpt = QuantizeCheckpoint.dir_for(out)
    ckpt.mkdir()
    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        _run(tiny_sdxl_dir, out, resume=True)
