import json
import shutil

import pytest
import torch

from vqdm.errors import ArtifactError
from vqdm.models import quantize_layers, vq_modules
from vqdm.models.artifact import MANIFEST_FILE, WEIGHTS_FILE, load_artifact, save_artifact, sha256_file


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, simple_quantizer):
    from vqdm.models import build_pipeline

    pipe = build_pipeline("tiny-sdxl", seed=0)
    quantize_layers(pipe.unet, 3, simple_quantizer(3))
    # the artifact stores floats as fp16: round the in-memory model the same way to compare exactly
    with torch.no_grad():
        for t in pipe.unet.parameters():
            t.copy_(t.half().float())
    out = tmp_path_factory.mktemp("art") / "tiny-vq"
    save_artifact(pipe, out, {"base_model": {"name": "tiny-sdxl"}, "layers": {n: {"rel_error": 0.1} for n, _ in vq_modules(pipe.unet)}})
    return pipe, out


def _copy(artifact, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(artifact[1], dst)
    return dst


def _rehash(path, rel):
    mf = path / MANIFEST_FILE
    manifest = json.loads(mf.read_text())
    manifest["files"][rel] = sha256_file(path / rel)
    mf.write_text(json.dumps(manifest))


def test_round_trip_is_bit_identical(artifact):
    pipe, out = artifact
    loaded = load_artifact(out)
    src, dst = dict(vq_modules(pipe.unet)), dict(vq_modules(loaded.unet))
    assert src.keys() == dst.keys()
    for name in src:
        for attr in ("codes", "codebooks", "scales"):
            assert torch.equal(getattr(src[name], attr), getattr(dst[name], attr)), (name, attr)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = pipe("a harbour", num_inference_steps=2, generator=gen(), output_type="pt").images
    b = loaded("a harbour", num_inference_steps=2, generator=gen(), output_type="pt").images
    assert torch.equal(a, b)
    assert loaded.vqdm_manifest["quantization"]["num_codebooks"] == 3


def test_layout_manifest_and_no_pickles(artifact):
    _, out = artifact
    for name in ("model_index.json", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae",
                 "unet/config.json", WEIGHTS_FILE, MANIFEST_FILE):
        assert (out / name).exists(), name
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pth", ".ckpt")]
    m = json.loads((out / MANIFEST_FILE).read_text())
    assert m["format_version"] == 1 and m["tool"]["name"] == "vqdm"
    assert set(m["files"]) >= {WEIGHTS_FILE, "unet/config.json", "model_index.json"}
    assert all(e["rel_error"] == 0.1 and e["bits"] > 0 for e in m["layers"])
    assert not list(out.parent.glob(".*partial*"))


def test_truncated_weights_are_refused(artifact, tmp_path):
    path = _copy(artifact, tmp_path)
    w = path / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"vqdm\.safetensors.*sha256 does not match"):
        load_artifact(path)


def test_edited_file_is_refused(artifact, tmp_path):
    path = _copy(artifact, tmp_path)
    cfg = path / "vae" / "config.json"
    cfg.write_text(cfg.read_text().replace("silu", "relu"))
    with pytest.raises(ArtifactError, match=r"vae/config\.json.*truncated or edited"):
        load_artifact(path)


def test_missing_file_is_refused(artifact, tmp_path):
    path = _copy(artifact, tmp_path)
    (path / "text_encoder_2" / "config.json").unlink()
    with pytest.raises(ArtifactError, match=r"text_encoder_2/config\.json: missing"):
        load_artifact(path)


def test_wrong_format_version_is_refused(artifact, tmp_path):
    path = _copy(artifact, tmp_path)
    mf = path / MANIFEST_FILE
    m = json.loads(mf.read_text())
    m["format_version"] = 99
    mf.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format version 99.*newer vqdm"):
        load_artifact(path)


def test_corrupt_manifest_and_non_artifact_are_refused(artifact, tmp_path):
    path = _copy(artifact, tmp_path)
    (path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json: not valid JSON"):
        load_artifact(path)
    with pytest.raises(ArtifactError, match="no such artifact folder"):
        load_artifact(tmp_path / "nowhere")


def test_shape_mismatch_with_config_is_refused(artifact, tmp_path):
    path = _copy(artifact, tmp_path)
    cfg_file = path / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["block_out_channels"] = [32, 80, 80]
    cfg_file.write_text(json.dumps(cfg))
    _rehash(path, "unet/config.json")  # a consistent manifest: only the shapes disagree now
    with pytest.raises(ArtifactError, match=r"vqdm\.safetensors: tensor .* has shape .* the config needs"):
        load_artifact(path)


def test_unreadable_weights_with_matching_hash_are_refused(artifact, tmp_path):
    path = _copy(artifact, tmp_path)
    (path / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    _rehash(path, WEIGHTS_FILE)
    with pytest.raises(ArtifactError, match="unreadable safetensors"):
        load_artifact(path)


def test_existing_output_is_not_overwritten(artifact):
    pipe, out = artifact
    with pytest.raises(FileExistsError, match="already exists"):
        save_artifact(pipe, out, {})


def test_unlisted_file_is_refused_by_name(artifact, tmp_path):
    path = _copy(artifact, tmp_path)
    (path / "vae" / "extra_weights.safetensors").write_bytes(b"not listed anywhere")
    with pytest.raises(ArtifactError, match=r"vae/extra_weights\.safetensors: not listed in the manifest"):
        load_artifact(path)


class _Trap:
    """Unpickling this writes a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_component_is_never_unpickled(artifact, tmp_path):
    """A component shipped as a pickle (.bin) instead of safetensors, listed with a valid hash (an
    artifact re-packed by someone else): refused, and the pickle is never executed."""
    path = _copy(artifact, tmp_path)
    marker = tmp_path / "unpickled"
    st = path / "vae" / "diffusion_pytorch_model.safetensors"
    st.unlink()
    torch.save({"trap": _Trap(marker)}, path / "vae" / "diffusion_pytorch_model.bin")
    mf = path / MANIFEST_FILE
    manifest = json.loads(mf.read_text())
    del manifest["files"]["vae/diffusion_pytorch_model.safetensors"]
    mf.write_text(json.dumps(manifest))
    _rehash(path, "vae/diffusion_pytorch_model.bin")
    with pytest.raises(ArtifactError, match="non-U-Net components"):
        load_artifact(path)
    assert not marker.exists()


def test_manifest_hash_names_the_artifact(artifact, tmp_path):
    from vqdm.models.artifact import inspect_artifact

    info = inspect_artifact(artifact[1])
    assert info["manifest_sha256"] == sha256_file(artifact[1] / MANIFEST_FILE) and len(info["manifest_sha256"]) == 64
    path = _copy(artifact, tmp_path)
    mf = path / MANIFEST_FILE
    mf.write_text(mf.read_text().replace('"tiny-sdxl"', '"someone-else"'))
    assert inspect_artifact(path)["manifest_sha256"] != info["manifest_sha256"]
