"""The embedded default: the shipped trained digits model, quantized offline with the real per-layer
quantizer into a prebuilt artifact (benchmarks/make_embedded_artifact.py), loaded by the server like
any artifact, still draws digits that scikit-learn's classifier recognises."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def embedded():
    """The default exactly as `vqdm serve` loads it with no model: (ServedModel, seconds to load)."""
    import time

    import torch

    from vqdm.server.loader import load_model
    from vqdm.server.settings import EMBEDDED_MODEL_ID, ModelSpec, Settings

    # One thread: tiny tensors on a shared 2-core machine; a second thread spin-waits against other
    # processes and made this module ~10x slower (past pytest's timeout) under load.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = load_model(ModelSpec(EMBEDDED_MODEL_ID, None), Settings(devices=["cpu"]), ["cpu"])
    yield model, time.perf_counter() - t0
    torch.set_num_threads(saved)


def test_every_selected_layer_is_vq_and_close_to_its_weight(embedded):
    from vqdm.models import Preset, load_pipeline, select_layers, vq_modules, weight_matrix
    from vqdm.models.digits import DIGITS_MODEL_DIR, DIGITS_PRESET

    model, seconds = embedded
    preset = Preset.from_name(DIGITS_PRESET)
    q = model.quantization
    assert model.source == "embedded" and "trained" in q["base_model"]["name"]
    assert (model.family, model.default_steps, model.default_guidance) == (preset.family, preset.steps, preset.guidance)
    assert model.default_width == model.default_height == preset.resolution
    layers = dict(vq_modules(model.replicas["cpu"].pipe.unet))
    dense = dict(select_layers(load_pipeline(DIGITS_MODEL_DIR).unet))  # the shipped trained weights
    assert set(layers) == set(dense) and len(layers) == q["layers"] == 180
    assert all(m.num_codebooks == 2 for m in layers.values()) and q["num_codebooks"] == 2
    errs = []
    for name, m in layers.items():
        w = weight_matrix(dense[name]).detach().float()
        errs.append(float((m.dequantize_matrix().float() - w).square().sum() / w.square().sum()))
    assert np.median(errs) < 0.2 and max(errs) < 1.0  # a real fit of the trained weights, not zeros or noise
    # /v1/models reports what the manifest recorded when the artifact was made, and it is true
    assert q["median_rel_weight_error"] == pytest.approx(np.median(errs), rel=0.05, abs=1e-3)
    assert 0 < q["quantize_seconds"] < 600 and q["calibration"].startswith("none: H = identity")
    assert seconds < 120  # loading a 4 MB artifact; bound generously for a loaded machine


def test_serves_through_the_runner(embedded):
    from vqdm.server.jobs import GenerationParams
    from vqdm.server.runner import Member, run_batch

    replica = embedded[0].replicas["cpu"]
    p = GenerationParams("vqdm-tiny-sdxl", "x", None, 1, 64, 64, 2, 5.0, "euler", 0)
    (image,) = run_batch(replica, [Member(p)]).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_quantized_default_draws_digits_the_judge_recognises(embedded):
    """Digits 0-9 x 2 seeds from the served (VQ) default, judged by scikit-learn's LogisticRegression
    on the real 8x8 digits: at least 70% must be classified as the digit asked for."""
    from vqdm.models import Preset
    from vqdm.models.digits import DIGITS_PRESET
    from vqdm.quantizer.evaluate.digits import DigitJudge, generate_digits, images_to_digits

    preset = Preset.from_name(DIGITS_PRESET)
    images, labels = generate_digits(embedded[0].replicas["cpu"].pipe, list(range(10)), [0, 1])  # preset's steps
    assert images[0].size == (preset.resolution, preset.resolution)
    judge = DigitJudge()
    predicted = judge.predict(images_to_digits(images))
    accuracy = float((predicted == np.array(labels)).mean())
    assert accuracy >= 0.7, f"{accuracy:.0%} of generated digits recognised; asked {labels}, judged {predicted.tolist()}"


def test_serving_the_default_never_imports_the_quantizer():
    """A fresh process builds `vqdm serve`'s command line and the app it builds with no model, waits
    for /readyz, asks /v1/models, and has not imported vqdm.quantizer (nor any module under it)."""
    script = textwrap.dedent("""
        import json, sys, time
        from fastapi.testclient import TestClient
        from vqdm.cli import build_parser
        from vqdm.server.app import create_app
        from vqdm.server.settings import Settings

        assert build_parser("serve").parse_args(["serve"]).command == "serve"
        with TestClient(create_app(Settings(devices=["cpu"], cpu_threads=1))) as client:
            deadline = time.monotonic() + 300
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, client.get("/readyz").text
                time.sleep(0.1)
            card = client.get("/v1/models").json()["data"][0]
        print(json.dumps({"model": card["id"], "layers": card["quantization"]["layers"],
                          "quantizer": sorted(m for m in sys.modules if m.startswith("vqdm.quantizer"))}))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["model"] == "vqdm-tiny-sdxl" and result["layers"] == 180, result  # it did serve the default
    assert result["quantizer"] == [], f"the server imported the offline quantizer: {result['quantizer']}"


def test_every_subcommand_has_its_module():
    """`vqdm COMMAND` imports only COMMANDS[COMMAND]: the map must name every subcommand there is."""
    from vqdm.cli import COMMANDS, build_parser

    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    assert list(sub.choices) == list(COMMANDS)
    for command, module in COMMANDS.items():
        (only,) = [a for a in build_parser(command)._actions if a.dest == "command"]
        assert command in only.choices, (command, module)


@pytest.fixture
def artifact_copy(tmp_path, monkeypatch):
    """A copy of the prebuilt artifact beside a copy of the dense folder it shares components with,
    installed as the embedded default."""
    import vqdm.server.embedded as embedded_module
    from vqdm.models.digits import DIGITS_ARTIFACT_DIR, DIGITS_MODEL_DIR

    for src in (DIGITS_MODEL_DIR, DIGITS_ARTIFACT_DIR):
        shutil.copytree(src, tmp_path / src.name)
    monkeypatch.setattr(embedded_module, "DIGITS_ARTIFACT_DIR", tmp_path / DIGITS_ARTIFACT_DIR.name)
    return tmp_path / DIGITS_ARTIFACT_DIR.name, tmp_path / DIGITS_MODEL_DIR.name


def _load_default(**settings):
    from vqdm.server.loader import load_model
    from vqdm.server.settings import EMBEDDED_MODEL_ID, ModelSpec, Settings

    return load_model(ModelSpec(EMBEDDED_MODEL_ID, None), Settings(devices=["cpu"], **settings), ["cpu"])


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tampered", ["unet/vqdm.safetensors", "../tiny-sdxl-digits/vae/diffusion_pytorch_model.safetensors"])
def test_a_tampered_prebuilt_artifact_is_refused(artifact_copy, tampered):
    """One flipped byte in the VQ weights, or in a component the artifact shares with the dense
    folder: the default is refused with the file and the reason, before anything loads from it."""
    from vqdm.errors import ArtifactError

    artifact, _ = artifact_copy
    _flip_byte(artifact / tampered)
    with pytest.raises(ArtifactError) as e:
        _load_default()
    assert Path(e.value.path).resolve() == (artifact / tampered).resolve()
    assert "sha256 does not match the manifest" in str(e.value)


def test_an_unlisted_file_in_the_shared_components_is_refused(artifact_copy):
    from vqdm.errors import ArtifactError

    artifact, dense = artifact_copy
    (dense / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not listed")
    with pytest.raises(ArtifactError, match="not listed in the manifest") as e:
        _load_default()
    assert Path(e.value.path).resolve() == (dense / "vae" / "diffusion_pytorch_model.bin").resolve()


def test_a_missing_default_or_another_k_says_how_to_make_it(artifact_copy):
    from vqdm.errors import VQDMError

    artifact, _ = artifact_copy
    with pytest.raises(VQDMError, match=r"K=2 codebooks \(seed 0\).*make_embedded_artifact.py --codebooks 3 --seed 0"):
        _load_default(embedded_codebooks=3)
    shutil.rmtree(artifact)
    with pytest.raises(VQDMError, match="artifact is missing from .*make_embedded_artifact.py"):
        _load_default()


def test_the_prebuilt_artifact_and_what_it_shares_are_package_data():
    """Every file the default's manifest lists (its own and the dense folder's it shares) installs
    with the package; together they stay small."""
    from vqdm.models.artifact import MANIFEST_FILE
    from vqdm.models.digits import DIGITS_ARTIFACT_DIR, DIGITS_MODEL_DIR

    manifest = json.loads((DIGITS_ARTIFACT_DIR / MANIFEST_FILE).read_text())
    listed = {(DIGITS_ARTIFACT_DIR / rel).resolve() for rel in [*manifest["files"], MANIFEST_FILE]}
    package = REPO / "vqdm" / "models"
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["vqdm.models"]
    data = {f.resolve() for g in globs for f in package.glob(g)}
    assert listed <= data, sorted(str(f) for f in listed - data)
    on_disk = sum(f.stat().st_size for d in (DIGITS_MODEL_DIR, DIGITS_ARTIFACT_DIR) for f in d.rglob("*") if f.is_file())
    assert on_disk <= 10e6, on_disk  # the repository's allowance for the demo model (9.25 MB: fp16 codebooks)
