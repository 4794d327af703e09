"""A single-file checkpoint wherever a model folder is taken: make-model writes a tiny Turbo file
without metadata, then plan, quantize (--subsets mid_block), eval, distill and generate read it, with
--family naming what the file cannot say."""
from __future__ import annotations

import json
import logging

import pytest

from vqdm.cli import main
from vqdm.models.artifact import read_manifest, sha256_file

pytestmark = pytest.mark.usefixtures("one_thread")
TURBO = ["--family", "sdxl-turbo"]


@pytest.fixture(scope="module")
def turbo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "my-turbo-finetune.safetensors"
    assert main(["make-model", "tiny-sdxl-turbo", "--single-file", str(path), "--dtype", "fp16", "--no-metadata",
                 "--seed", "3"]) == 0
    return path


@pytest.fixture(scope="module")
def artifact(turbo_file, tmp_path_factory):
    from tests.quantizer.conftest import TINY_ARGS

    out = tmp_path_factory.mktemp("single") / "vq2"
    assert main(["quantize", "--model", str(turbo_file), "--preset", "sdxl-turbo", "--bits", "2", "--out", str(out),
                 "--subsets", "mid_block", *TURBO, *TINY_ARGS]) == 0
    return out


def test_plan_reads_the_file_and_says_its_family(turbo_file, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="vqdm.models.loading"):
        assert main(["plan", "--model", str(turbo_file), "--bits", "2", "--subsets", "mid_block", *TURBO]) == 0
    assert "subsets quantized:  mid_block" in capsys.readouterr().out
    assert "family sdxl-turbo (from --family); architecture tiny-sdxl-turbo, F16, VAE baked in" in caplog.text
    with caplog.at_level(logging.INFO, logger="vqdm.models.loading"):
        assert main(["plan", "--model", str(turbo_file), "--bits", "2"]) == 0
    assert "family sdxl (weights cannot tell Turbo from SDXL and the metadata does not say; pass --family " \
           "sdxl-turbo for a Turbo model)" in caplog.text


def test_quantize_from_a_file_records_it_as_the_base(turbo_file, artifact):
    manifest = read_manifest(artifact)
    assert manifest["base_model"] == {"name": turbo_file.name, "family": "sdxl-turbo",
                                      "unet_sha256": sha256_file(turbo_file)}
    assert manifest["quantization"]["subsets"] == ["mid_block"]
    for comp in ("text_encoder", "text_encoder_2", "vae", "scheduler", "tokenizer", "tokenizer_2"):
        assert (artifact / comp).is_dir(), comp  # written from the loaded pipeline: nothing to copy from


def test_generate_from_the_file_and_from_its_artifact(turbo_file, artifact, tmp_path):
    for model in (turbo_file, artifact):
        out = tmp_path / f"{model.stem}.png"
        assert main(["generate", "a red fox", "--model", str(model), "--steps", "1", "--size", "64x64",
                     "-o", str(out), *TURBO]) == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_and_distill_take_the_file_as_reference_and_teacher(turbo_file, artifact, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--reference", str(turbo_file), "--candidate", str(artifact), "--out", str(out),
                 "--num-prompts", "2", "--steps", "1", "--resolution", "64", "--chunk-prompts", "2",
                 "--unet-mse-prompts", "1", "--no-progress", *TURBO]) == 0
    meta = json.loads((out / "eval_meta.json").read_text())
    assert meta["family"] == "sdxl-turbo"
    assert not any("different U-Net" in n for n in meta.get("notes", []))
    distilled = tmp_path / "distilled"
    assert main(["distill", "--teacher", str(turbo_file), "--student", str(artifact), "--out", str(distilled),
                 "--steps", "1", "--num-prompts", "4", "--seeds-per-prompt", "1", "--rounds", "1", "--resolution", "64",
                 "--train-steps", "2", "--batch-size", "2", "--gen-batch-size", "2", "--val-prompts", "1",
                 "--test-prompts", "1", "--eval-every", "1", "--allow-worse", "--no-progress", *TURBO]) == 0
    assert read_manifest(distilled)["distillation"]["teacher"]["family"] == "sdxl-turbo"
    assert (distilled / "text_encoder_2").is_dir()
