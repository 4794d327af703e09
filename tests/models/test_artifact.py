import json
import shutil
from pathlib import Path

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


@pytest.mark.parametrize("entry", ["../secret", "unet/../../secret", "/ABSOLUTE", "unet//config.json"])
def test_manifest_entry_outside_the_artifact_is_refused(artifact, tmp_path, entry):
    """An entry naming a file outside the artifact, listed with that file's true hash: refused
    with the entry named (main hashed it and accepted it)."""
    from vqdm.models.artifact import read_manifest, verify_files

    path = _copy(artifact, tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("a file outside the artifact")
    entry = str(secret) if entry == "/ABSOLUTE" else entry
    manifest = read_manifest(path)
    manifest["files"][entry] = sha256_file(path / entry)
    with pytest.raises(ArtifactError, match=f"file entry {entry!r} is not a plain path inside the artifact"):
        verify_files(path, manifest)


@pytest.fixture
def shared_artifact(tmp_path):
    """A copy of the embedded default: an artifact sharing its dense neighbour's components."""
    from vqdm.models.digits import DIGITS_ARTIFACT_DIR, DIGITS_MODEL_DIR

    for src in (DIGITS_MODEL_DIR, DIGITS_ARTIFACT_DIR):
        shutil.copytree(src, tmp_path / src.name)
    return tmp_path / DIGITS_ARTIFACT_DIR.name


def test_shared_components_are_the_one_place_outside(shared_artifact):
    """The declared components folder is checked like the artifact: its files are accepted, a `..`
    beyond it is not, even with the escaped file's true hash."""
    from vqdm.models.artifact import read_manifest, verify_files

    manifest = read_manifest(shared_artifact)
    verify_files(shared_artifact, manifest)
    escape = f"{manifest['components']}/../outside.txt"
    (shared_artifact.parent / "outside.txt").write_text("not a component")
    manifest["files"][escape] = sha256_file(shared_artifact / escape)
    with pytest.raises(ArtifactError, match="is not a plain path inside the artifact or its declared components"):
        verify_files(shared_artifact, manifest)


@pytest.mark.parametrize("where", ["component folder", "listed file", "shared component folder"])
def test_symbolic_links_are_refused(artifact, shared_artifact, tmp_path, where):
    """A linked folder hid an unlisted model.safetensors from the unlisted-file check; a linked
    file or folder passed as what it points to. All refused, in the artifact and its shared folder."""
    from vqdm.models.artifact import read_manifest, verify_files

    path = _copy(artifact, tmp_path) if where != "shared component folder" else shared_artifact
    outside = tmp_path / "elsewhere"
    if where == "listed file":
        link = path / "vae" / "config.json"
        outside.mkdir()
        shutil.move(link, outside / "config.json")
        link.symlink_to(outside / "config.json")
    else:
        link = (path if where == "component folder" else path.parent / "tiny-sdxl-digits") / "vae"
        shutil.move(link, outside)
        if where == "component folder":  # the reproduction: hidden from the unlisted-file check
            (outside / "model.safetensors").write_bytes(b"unlisted weights")
        link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(ArtifactError, match="symbolic link") as e:
        verify_files(path, read_manifest(path))
    assert Path(e.value.path).is_symlink() and Path(e.value.path).name == link.name


def test_without_hashes_the_layout_is_still_checked(artifact, tmp_path):
    """verify=False (the server's verify_artifacts off) skips only the sha256: an edited file
    loads, an unlisted one is still refused."""
    from vqdm.models.artifact import read_manifest, verify_files

    path = _copy(artifact, tmp_path)
    cfg = path / "vae" / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        verify_files(path, read_manifest(path))
    verify_files(path, read_manifest(path), hashes=False)
    (path / "unet" / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="not listed in the manifest"):
        verify_files(path, read_manifest(path), hashes=False)
