"""`vqdm quantize --subsets` (the others stay dense) and `--calibrate-skipped`, on the tiny SDXL folder."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from vqdm.cli import main
from vqdm.errors import ArtifactError
from vqdm.models import SUBSETS, select_layers, subset_of, vq_modules
from vqdm.models.artifact import MANIFEST_FILE, WEIGHTS_FILE, load_artifact, verify_files
from vqdm.quantizer.quantize.checkpoint import QuantizeCheckpoint
from vqdm.quantizer.quantize.run import QuantizeStopped
from vqdm.server.loader import quantization_summary

pytestmark = pytest.mark.usefixtures("one_thread")

# One sampling step: every subset is one U-Net call per pass.
ONE_STEP = ["--steps", "1"]


@pytest.fixture(scope="module")
def partial_run(tiny_sdxl_dir, tiny_args, tmp_path_factory):
    """down_blocks.0 quantized, the six others calibrated and left dense."""
    out = tmp_path_factory.mktemp("subsets") / "db0"
    args = ["--model", str(tiny_sdxl_dir), "--preset", "sdxl", "--bits", "3", *tiny_args, *ONE_STEP,
            "--subsets", "down_blocks.0", "--calibrate-skipped"]
    assert main(["quantize", *args, "--out", str(out)]) == 0
    return out, args


def _manifest(out):
    return json.loads((out / MANIFEST_FILE).read_text())


def test_only_the_chosen_subsets_are_vq_and_the_artifact_loads(partial_run, capsys):
    out, _ = partial_run
    m = _manifest(out)
    assert m["quantization"]["subsets"] == ["down_blocks.0"]
    assert {subset_of(e["name"]) for e in m["layers"]} == {"down_blocks.0"}

    pipe = load_artifact(out)
    vq = [n for n, _ in vq_modules(pipe.unet)]
    dense = [n for n, _ in select_layers(pipe.unet)]
    assert len(vq) == 5 and {subset_of(n) for n in vq} == {"down_blocks.0"}
    assert dense and {subset_of(n) for n in dense} == set(SUBSETS[1:])  # dense layers load as plain Linear/Conv2d
    summary = quantization_summary(pipe.unet, pipe.vqdm_manifest)  # what /v1/models shows
    assert summary["layers"] == 5 and summary["subsets"] == ["down_blocks.0"]
    assert summary["bits_per_weight_quantized"] < summary["bits_per_weight_unet"] < 16  # dense layers count 16
    image = pipe("a fox", num_inference_steps=1, guidance_scale=1.0, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert torch.isfinite(torch.from_numpy(image)).all()

    # inspect prices exactly what the artifact holds, as plan does for the same subsets
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["integrity"] == "ok" and info["subsets"] == ["down_blocks.0"] and info["layers"] == 5
    assert main(["plan", "--model", str(out), "--bits", "3", "--subsets", "down_blocks.0", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["unet_bytes"] == info["unet_bytes"] == m["bytes"]["unet_stored"]
    assert main(["plan", "--model", str(out), "--bits", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unet_bytes"] < plan["unet_bytes"]  # all seven: smaller
    assert main(["inspect", str(out)]) == 0
    assert "1 of 7 quantized (down_blocks.0)" in capsys.readouterr().out


def test_every_subset_is_calibrated_and_recorded(partial_run):
    out, _ = partial_run
    subsets = _manifest(out)["calibration"]["subsets"]
    assert [s["subset"] for s in subsets] == list(SUBSETS)
    assert [s["quantized"] for s in subsets] == [True] + [False] * 6
    for s in subsets:
        assert s["passes"] == 1 and s["h_bytes"] > 0 and s["calibration_seconds"] > 0
    assert subsets[0]["median_rel_error"] is not None and subsets[1]["median_rel_error"] is None
    assert all(s["quantization_seconds"] == 0 for s in subsets[1:])


def test_generate_serves_a_partly_dense_artifact(partial_run, tmp_path):
    """`vqdm generate` goes through the server's loader."""
    out, _ = partial_run
    png = tmp_path / "a.png"
    assert main(["generate", "a fox", "--model", str(out), "-o", str(png), "--steps", "1", "--size", "64x64",
                 "--guidance", "1", "--device", "cpu"]) == 0
    assert png.stat().st_size > 0


def test_resume_across_a_statistics_only_subset_is_bit_identical(partial_run, tmp_path):
    out, args = partial_run
    resumed = tmp_path / "resumed"
    with pytest.raises(QuantizeStopped):
        main(["--verbose", "quantize", *args, "--out", str(resumed), "--stop-after-subset", "1"])
    state = json.loads((QuantizeCheckpoint.dir_for(resumed) / "state.json").read_text())
    assert [(e["subset"], e["info"]["quantized"]) for e in state["finished"]] == \
        [("down_blocks.0", True), ("down_blocks.1", False)]
    # other subsets on resume: refused, the difference named
    assert main(["quantize", *args[:-3], "--subsets", "mid_block", "--calibrate-skipped", "--out", str(resumed),
                 "--resume"]) == 1
    assert main(["quantize", *args, "--out", str(resumed), "--resume"]) == 0
    with safe_open(str(out / WEIGHTS_FILE), "pt") as a, safe_open(str(resumed / WEIGHTS_FILE), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_without_calibrate_skipped_only_the_chosen_subsets_run(tiny_sdxl_dir, tiny_args, tmp_path):
    out = tmp_path / "up2"
    assert main(["quantize", "--model", str(tiny_sdxl_dir), "--preset", "sdxl", "--bits", "2", *tiny_args, *ONE_STEP,
                 "--subsets", "up_blocks.2", "--out", str(out)]) == 0
    m = _manifest(out)
    assert [s["subset"] for s in m["calibration"]["subsets"]] == ["up_blocks.2"]
    assert m["quantization"]["subsets"] == ["up_blocks.2"] and len(m["layers"]) == 9


@pytest.mark.parametrize("argv, message", [
    (["--subsets", "mid_block,up_blocks.9"], "unknown subset(s) up_blocks.9; the U-Net's subsets are down_blocks.0,"),
    (["--subsets", " , "], "no subset given; choose from down_blocks.0"),
    (["--calibrate-skipped"], "--calibrate-skipped needs --subsets"),
])
def test_bad_subsets_are_refused_before_any_work(argv, message, tiny_sdxl_dir, tmp_path, capsys, tiny_args):
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(tiny_sdxl_dir), "--preset", "sdxl", "--bits", "3", "--out", str(out),
                 *tiny_args, *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not out.exists() and not QuantizeCheckpoint.dir_for(out).exists()


def test_plan_refuses_an_unknown_subset(capsys):
    assert main(["plan", "--preset", "tiny-sdxl", "--bits", "3", "--subsets", "middle"]) == 1
    assert "unknown subset(s) middle" in capsys.readouterr().err


def test_loader_refuses_a_manifest_whose_subsets_do_not_match_the_weights(partial_run, tmp_path):
    import shutil

    out, _ = partial_run
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    manifest = _manifest(bad)
    manifest["quantization"]["subsets"] = list(SUBSETS)  # claims every subset, lists 5 layers
    (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="layer list does not match the U-Net config and quantized subsets"):
        load_artifact(bad)
    manifest["quantization"]["subsets"] = ["middle"]
    (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="quantization.subsets"):
        verify_files(bad, manifest) or load_artifact(bad)


def test_an_artifact_quantizes_whole_subsets(tiny_sdxl_dir, tmp_path):
    from vqdm.models import load_pipeline, quantize_layers
    from vqdm.models.artifact import save_artifact

    pipe = load_pipeline(tiny_sdxl_dir, dtype=torch.float32, device="cpu")
    first = next(n for n, _ in select_layers(pipe.unet) if subset_of(n) == "down_blocks.0")

    def zeros(name, w):
        n, d = w.shape
        return torch.zeros(n, d // 8, 3, dtype=torch.uint8), torch.zeros(3, 256, 8), torch.ones(n)

    quantize_layers(pipe.unet, 3, zeros, names=[first])
    with pytest.raises(ValueError, match="subset down_blocks.0 is only partly quantized"):
        save_artifact(pipe, tmp_path / "a", {}, source_dir=tiny_sdxl_dir)
    assert not (tmp_path / "a").exists()
