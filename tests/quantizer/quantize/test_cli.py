"""`vqdm quantize` end to end on tiny SDXL and Turbo folders, and every bad input it must refuse."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from vqdm.cli import main



def _generate(artifact, steps: int, guidance: float):
    from vqdm.models.artifact import load_artifact

    pipe = load_artifact(artifact)
    image = pipe("a red fox in snow", num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    return pipe, image


def test_sdxl_preset_end_to_end(sdxl_run, tiny_sdxl_dir, capsys):
    from vqdm.models import select_layers, vq_modules
    from vqdm.models.artifact import unet_fingerprint

    assert sdxl_run.rc == 0, sdxl_run.stderr
    pipe, image = _generate(sdxl_run.out, steps=2, guidance=5.0)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert len(vq_modules(pipe.unet)) == 180 and not select_layers(pipe.unet)  # every selected layer is VQ

    m = pipe.vqdm_manifest
    assert m["quantization"]["num_codebooks"] == 3 and m["quantization"]["method"] == "aq"
    assert m["quantization"]["damping"] == 0.1 and m["quantization"]["cg_iters"] == 20  # --damping; the default fit
    assert m["quantization"]["init_passes"] == 1 and m["quantization"]["relative_tolerance"] == 0.01  # the new flags
    assert m["base_model"]["unet_sha256"] == unet_fingerprint(source_dir=tiny_sdxl_dir)
    cal = m["calibration"]
    assert (cal["preset"], cal["scheduler"], cal["guidance"], cal["steps"], cal["num_prompts"], cal["resolution"]) == \
        ("sdxl", "DDIMScheduler", 5.0, 2, 2, 64)
    assert cal["unet_evaluations"] == 2 * 2 * 2 and [s["subset"] for s in cal["subsets"]][0] == "down_blocks.0"
    for entry in m["layers"]:
        assert 0 <= entry["rel_error"] < 1 and entry["seconds"] >= 0 and entry["rows"] > 0 and entry["bits"] > 3
    assert not (sdxl_run.out.parent / "sdxl-3bit.checkpoint").exists()  # removed once the artifact is written

    # The summary: one line per layer with its error, bits and seconds, then per subset and totals.
    assert "up_blocks.2.resnets.2.conv2" in sdxl_run.stdout and "180 layers, median rel.error" in sdxl_run.stdout
    assert main(["inspect", str(sdxl_run.out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["integrity"] == "ok"


def test_each_subset_is_calibrated_on_the_partly_quantized_student(sdxl_run):
    from vqdm.models import SUBSETS, subset_of

    assert [subset_of(p["names"][0]) for p in sdxl_run.passes] == list(SUBSETS)
    for k, p in enumerate(sdxl_run.passes):
        assert {subset_of(n) for n in p["names"]} == {SUBSETS[k]}
        assert {subset_of(n) for n in p["vq"]} == set(SUBSETS[:k])  # exactly the earlier subsets are VQ


def test_turbo_preset_end_to_end(tiny_turbo_dir, tmp_path, capsys, tiny_args):
    out = tmp_path / "turbo-2bit"
    # One subset: what is Turbo's own here is the calibration (scheduler, no CFG, cycled steps) and K=2;
    # quantizing all seven subsets in order is test_sdxl_preset_end_to_end's (the same U-Net layout).
    args = ["quantize", "--model", str(tiny_turbo_dir), "--preset", "sdxl-turbo", "--bits", "2", "--out", str(out),
            *tiny_args, "--guidance", "0", "--num-prompts", "4", "--batch-size", "1", "--subsets", "down_blocks.0"]
    assert main(args) == 0, capsys.readouterr().err
    pipe, image = _generate(out, steps=1, guidance=0.0)
    assert np.isfinite(image).all()
    cal = pipe.vqdm_manifest["calibration"]
    assert cal["scheduler"] == "EulerAncestralDiscreteScheduler" and cal["guidance"] == 0.0 and cal["vary_steps"]
    assert cal["unet_evaluations"] == 1 + 2 + 1 + 2  # no CFG half; batches cycle through 1..2 steps
    assert pipe.vqdm_manifest["quantization"]["num_codebooks"] == 2
    assert pipe.vqdm_manifest["quantization"]["subsets"] == ["down_blocks.0"] and len(pipe.vqdm_manifest["layers"]) == 5


def _not_sdxl(tmp_path):
    folder = tmp_path / "sd15"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


BAD_INPUTS = {
    "not an SDXL folder": (lambda t, m: ["--model", str(_not_sdxl(t))], "not SDXL"),
    "no model folder": (lambda t, m: ["--model", str(t / "nowhere")], "no such folder"),
    "unsupported K": (lambda t, m: ["--bits", "5"], "choose 2, 3 or 4"),
    "unsupported B": (lambda t, m: ["--codebook-bits", "4"], "B must be 8"),
    "unsupported g": (lambda t, m: ["--group-size", "16"], "g=8"),
    "unknown preset": (lambda t, m: ["--preset", "sd3"], "choose sdxl or sdxl-turbo"),
    "empty prompt file": (lambda t, m: ["--prompts", str(_write(t / "empty.txt", "\n \n"))], "no prompts"),
    "missing prompt file": (lambda t, m: ["--prompts", str(t / "missing.txt")], "prompt file not found"),
    "bad resolution": (lambda t, m: ["--resolution", "100"], "multiple of"),
    "out exists": (lambda t, m: ["--out", str(_mkdir(t / "taken"))], "already exists"),
    "resume without checkpoint": (lambda t, m: ["--resume"], "no checkpoint"),
    "out overlaps the model": (lambda t, m: ["--out", str(m / "quantized")], "overlaps"),
}


def _write(path, text):
    path.write_text(text)
    return path


def _mkdir(path):
    path.mkdir()
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_nonzero_and_writes_nothing(case, tiny_sdxl_dir, tmp_path, capsys, tiny_args):
    make_args, message = BAD_INPUTS[case]
    args = {"--model": str(tiny_sdxl_dir), "--preset": "sdxl", "--bits": "3", "--out": str(tmp_path / "out")}
    extra = make_args(tmp_path, tiny_sdxl_dir)
    flags = [a for a in extra if a.startswith("--") and a in args]
    for flag in flags:  # replace a default flag, keep the others
        i = extra.index(flag)
        args[flag] = extra[i + 1]
        extra = extra[:i] + extra[i + 2:]
    before = set(tmp_path.iterdir()) | set(tiny_sdxl_dir.iterdir())
    argv = ["quantize", *[x for kv in args.items() for x in kv], *tiny_args, *extra]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert set(tmp_path.iterdir()) | set(tiny_sdxl_dir.iterdir()) == before  # no artifact, no checkpoint


def test_bad_input_from_a_shell(tmp_path):
    """The real process: exit code 1, one line on stderr, no traceback."""
    r = subprocess.run([sys.executable, "-m", "vqdm.cli", "quantize", "--model", str(tmp_path), "--preset", "sdxl",
                        "--bits", "3", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "model_index.json" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
