"""Settings from VQDM_* variables and flags, and the serve / generate commands' user-facing errors."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from vqdm.cli import main
from vqdm.server.settings import EMBEDDED_MODEL_ID, ModelSpec, Settings, parse_model_spec


def test_env_lists_are_comma_separated(monkeypatch, tmp_path):
    monkeypatch.setenv("VQDM_MODELS", f"a={tmp_path}/a, b={tmp_path}/b")
    monkeypatch.setenv("VQDM_API_KEYS", "key-number-1,key-number-2")
    monkeypatch.setenv("VQDM_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("VQDM_JSON_LOGS", "true")
    s = Settings()
    assert [m.id for m in s.model_specs()] == ["a", "b"] and s.model_specs()[1].path == tmp_path / "b"
    assert s.api_keys == ["key-number-1", "key-number-2"] and s.max_batch_size == 8 and s.json_logs
    assert "key-number" not in repr(s)  # keys stay out of logs and tracebacks


def test_no_model_means_the_embedded_default(monkeypatch):
    monkeypatch.delenv("VQDM_MODELS", raising=False)
    assert Settings().model_specs() == [ModelSpec(EMBEDDED_MODEL_ID, None)]


def test_model_spec_forms():
    assert parse_model_spec("/models/sdxl-vq3") == parse_model_spec("sdxl-vq3=/models/sdxl-vq3")
    with pytest.raises(ValueError, match="model id"):
        parse_model_spec("bad name=/x")
    with pytest.raises(ValueError, match="empty path"):
        parse_model_spec("name=")


def test_flags_win_over_environment(monkeypatch):
    from vqdm.server.cli import build_settings

    monkeypatch.setenv("VQDM_PORT", "9000")
    monkeypatch.setenv("VQDM_MAX_QUEUE_SIZE", "7")
    args = argparse.Namespace(port=9100, model=None, api_key=None, no_warmup=False)
    s = build_settings(args)
    assert (s.port, s.max_queue_size, s.warmup) == (9100, 7, False)


def test_verify_artifacts_takes_effect_both_ways(tiny_artifact, tmp_path, monkeypatch):
    """An artifact whose weights were edited in place (same size, still loadable): refused at load
    with verify_artifacts on (the default), loaded with it off (`--no-verify-artifacts`), which skips
    the hashing of GB-sized files at start-up."""
    import shutil

    from vqdm.errors import ArtifactError
    from vqdm.models.artifact import WEIGHTS_FILE
    from vqdm.server.cli import build_settings
    from vqdm.server.loader import load_model

    path = tmp_path / "edited"
    shutil.copytree(tiny_artifact, path)
    weights = bytearray((path / WEIGHTS_FILE).read_bytes())
    weights[-2] ^= 1  # the low byte of the last fp16 value: a slightly different weight, a different hash
    (path / WEIGHTS_FILE).write_bytes(bytes(weights))
    spec = ModelSpec("edited", path)
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        load_model(spec, Settings(devices=["cpu"]), ["cpu"])
    assert load_model(spec, Settings(devices=["cpu"], verify_artifacts=False), ["cpu"]).quantization["layers"] > 0
    monkeypatch.delenv("VQDM_VERIFY_ARTIFACTS", raising=False)
    assert build_settings(argparse.Namespace(no_verify_artifacts=False)).verify_artifacts is False


@pytest.mark.parametrize("argv,message", [
    (["serve", "--max-batch-size", "0"], "max_batch_size"),
    (["serve", "--weight-cache", "sometimes"], "weight-cache mode"),
    (["serve", "--model", "a=/x", "--model", "a=/y"], "given twice"),
    (["serve", "--api-key", "short"], "at least 8"),
    (["serve", "--model", "m=/no/such/folder"], "no such folder"),
    (["serve", "--image-store-dir", "/dev/null/images"], "image_store_dir /dev/null/images: cannot write there"),
    (["serve", "--public-url", "images.example.com"], "must start with http:// or https://"),
    (["serve", "--image-store-ttl", "0"], "image_store_ttl_s"),
])
def test_serve_refuses_bad_configuration_in_one_line(capsys, argv, message):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vqdm serve: error:") and message in err and "\n" not in err


def test_generate_writes_the_image_a_server_would(tiny_artifact, tmp_path, capsys, served_models):
    out = tmp_path / "cube.png"
    assert main(["generate", "a red cube", "--model", str(tiny_artifact), "-o", str(out), "--steps", "2",
                 "--seed", "4", "--size", "64x64", "--device", "cpu"]) == 0
    assert "seed 4" in capsys.readouterr().out
    from PIL import Image

    from vqdm.server.jobs import GenerationParams
    from vqdm.server.runner import Member, run_batch

    got = np.asarray(Image.open(out)).astype(np.int16)
    p = GenerationParams("tiny", "a red cube", None, 1, 64, 64, 2, 5.0, "euler", 4)
    want = np.asarray(run_batch(served_models[0].replicas["cpu"], [Member(p)]).images[0][0]).astype(np.int16)
    assert np.abs(got - want).max() <= 1
    assert main(["generate", "x", "--model", str(tiny_artifact), "-o", str(tmp_path / "x.gif")]) == 1
    assert "unknown image type" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(tiny_artifact), "-o", str(tmp_path / "x.png"), "--size", "65x64"]) == 1
    assert "multiples of 8" in capsys.readouterr().err


def test_generate_on_the_embedded_default_says_the_size_it_drew_at(tmp_path, capsys):
    """Size policy nearest (auto, for the embedded default): 64x64 is drawn at the trained 32² and resized."""
    from PIL import Image

    out = tmp_path / "three.png"
    assert main(["generate", "a handwritten digit 3", "-o", str(out), "--size", "64x64", "--steps", "2",
                 "--device", "cpu"]) == 0
    assert Image.open(out).size == (64, 64)
    assert "64x64 (drawn at 32x32, the trained size nearest it, and resized: size policy nearest)" in \
        capsys.readouterr().out


def test_serve_exits_1_on_a_corrupt_artifact(tiny_artifact, tmp_path):
    import shutil
    import socket
    import subprocess
    import sys

    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact, bad)
    weights = bad / "unet" / "vqdm.safetensors"
    weights.chmod(0o644)
    with open(weights, "ab") as f:
        f.write(b"tampered")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "vqdm.cli", "serve", "--model", f"bad={bad}", "--port", str(port),
                           "--log-level", "error"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vqdm serve: error: start-up failed: ArtifactError") and "sha256 does not match" in last


def test_max_n_is_capped_by_the_batch_size():
    import pytest
    from pydantic import ValidationError

    from vqdm.server.settings import Settings

    assert Settings(max_batch_size=2).max_n == 2  # the default follows the batch size down
    assert Settings(max_batch_size=8).max_n == 4
    with pytest.raises(ValidationError, match="max_n 4 exceeds max_batch_size 2"):
        Settings(max_batch_size=2, max_n=4)


def test_drain_grace_period():
    from vqdm.server.drain import FLUSH_S, MARGIN_S, grace_period_s

    assert grace_period_s(60) == 60 + FLUSH_S + MARGIN_S
    assert grace_period_s(0.5, pre_stop_s=5) == 5 + 1 + FLUSH_S + MARGIN_S  # rounded up, never "forever"


def test_serve_reads_a_single_file_without_a_vae_through_its_flags(tmp_path):
    """`vqdm serve --vae/--family/--config` (VQDM_SINGLE_FILE_*) reach every single-file model, as
    generate's do: a checkpoint without a baked VAE loads with the one named."""
    import torch

    from vqdm.models import make_model
    from vqdm.models.builders import make_single_file
    from vqdm.cli import build_parser
    from vqdm.server.cli import build_settings
    from vqdm.server.loader import load_model

    ckpt = make_single_file("tiny-sdxl-turbo", tmp_path / "t.safetensors", dtype=torch.float32, include_vae=False)
    folder = make_model("tiny-sdxl-turbo", tmp_path / "folder")
    args = build_parser("serve").parse_args(["serve", "--model", f"t={ckpt}", "--model", f"f={folder}",
                                             "--vae", str(folder), "--family", "sdxl-turbo", "--device", "cpu"])
    settings = build_settings(args)
    file_spec, folder_spec = settings.model_specs()
    assert file_spec.single_file.vae == str(folder) and file_spec.single_file.family == "sdxl-turbo"
    assert folder_spec.single_file is None  # a folder says all this itself
    model = load_model(file_spec, settings, ["cpu"])
    assert model.family == "sdxl-turbo" and model.replicas["cpu"].pipe.vae is not None
    with pytest.raises(Exception, match="--vae"):  # without it, the error names the flag
        load_model(build_settings(build_parser("serve").parse_args(["serve", "--model", f"t={ckpt}"])).model_specs()[0],
                   settings, ["cpu"])
