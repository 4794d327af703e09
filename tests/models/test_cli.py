import json
import subprocess
import sys

from vqdm.cli import main


def test_plan_json_reports_spec_numbers(capsys):
    assert main(["plan", "--preset", "sdxl", "--bits", "4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layers"] == 771 and plan["quantized_weights"] == 2_540_953_600
    for key in ("unet_params", "bits_per_weight_quantized", "bits_per_weight_unet", "unet_bytes", "dense_fp16_bytes"):
        assert key in plan


def test_make_model_plan_inspect_round(tmp_path, capsys):
    folder = tmp_path / "tiny"
    assert main(["make-model", "tiny-sdxl-turbo", "--out", str(folder), "--seed", "1"]) == 0
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert main(["plan", "--model", str(folder), "--bits", "2", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["layers"] == 180
    assert main(["make-model", "tiny-sdxl", "--out", str(folder)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_inspect_reports_integrity(tmp_path, capsys, simple_quantizer):
    from vqdm.models import build_pipeline, quantize_layers
    from vqdm.models.artifact import WEIGHTS_FILE, save_artifact

    pipe = build_pipeline("tiny-sdxl")
    quantize_layers(pipe.unet, 2, simple_quantizer(2))
    art = save_artifact(pipe, tmp_path / "a", {"base_model": {"name": "tiny-sdxl"}})
    assert main(["inspect", str(art), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["integrity"] == "ok" and info["layers"] == 180 and info["quantization"]["num_codebooks"] == 2
    (art / WEIGHTS_FILE).write_bytes(b"x")
    assert main(["inspect", str(art)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out
    from vqdm.models.artifact import MANIFEST_FILE, sha256_file

    assert f"manifest:     sha256 {sha256_file(art / MANIFEST_FILE)}" in out  # one value names the artifact


def test_errors_are_one_line_with_nonzero_exit(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vqdm.cli", "plan", "--model", str(tmp_path), "--bits", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "model_index.json" in r.stderr and "Traceback" not in r.stderr
