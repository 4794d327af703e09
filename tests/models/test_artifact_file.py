"""An artifact exported as one .safetensors file (`vqdm export --single-file`): it loads as the
folder does, everywhere a folder is taken, and is refused with the file and the reason when
tampered with, truncated or foreign. Built from the packaged digits artifact (real trained
weights; its components are shared with the dense folder beside it)."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vqdm.cli import main
from vqdm.errors import ArtifactError
from vqdm.models import detect_family, load_pipeline, read_model_index, read_unet_config
from vqdm.models.artifact import MANIFEST_FILE, WEIGHTS_FILE, inspect_artifact, load_artifact, load_vq_unet
from vqdm.models.artifact_file import (FILES_KEY, HASHES_KEY, MANIFEST_KEY, export_single_file, is_artifact_file,
                                       read_safetensors_header)
from vqdm.models.digits import DIGITS_ARTIFACT_DIR, DIGITS_MODEL_DIR

FOLDER = DIGITS_ARTIFACT_DIR


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "digits-vq2.safetensors"
    result = export_single_file(FOLDER, out)
    return result


@pytest.fixture(scope="module")
def both(exported):
    return load_artifact(FOLDER), load_artifact(exported.path)


def _copy(exported, tmp_path):
    dst = tmp_path / "copy.safetensors"
    shutil.copy(exported.path, dst)
    return dst


def _resave(src, dst, edit_metadata=None, edit_tensors=None):
    """Re-write an artifact file as another tool would: same tensors, metadata edited."""
    with safe_open(str(src), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(src))
    if edit_metadata:
        edit_metadata(metadata)
    if edit_tensors:
        edit_tensors(tensors, metadata)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def _edit_json(metadata, key, fn):
    value = json.loads(metadata[key])
    fn(value)
    metadata[key] = json.dumps(value)


def test_file_loads_as_the_folder_does(both, exported):
    folder, single = both
    for comp in ("unet", "text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(folder, comp).state_dict(), getattr(single, comp).state_dict()
        assert a.keys() == b.keys(), comp
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), comp
    assert single.vqdm_manifest == folder.vqdm_manifest
    assert type(single.scheduler) is type(folder.scheduler) and single.scheduler.config == folder.scheduler.config
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    x = folder("seven", num_inference_steps=1, generator=gen(), output_type="pt").images
    y = single("seven", num_inference_steps=1, generator=gen(), output_type="pt").images
    assert torch.equal(x, y)
    # what the server and the CLI read before loading: the folder's answers
    assert read_model_index(exported.path) == read_model_index(FOLDER)
    assert detect_family(exported.path) == detect_family(FOLDER) == "sdxl"
    assert read_unet_config(exported.path) == read_unet_config(FOLDER)
    unet, manifest = load_vq_unet(exported.path)
    assert manifest == folder.vqdm_manifest and unet.state_dict().keys() == folder.unet.state_dict().keys()


def test_layout_prefixes_metadata_and_sizes(exported):
    header = read_safetensors_header(exported.path)
    assert {key.split(".", 1)[0] for key in header.tensors} == {"unet", "text_encoder", "text_encoder_2", "vae"}
    unet = load_file(str(FOLDER / WEIGHTS_FILE))
    with safe_open(str(exported.path), framework="pt") as f:
        assert all(torch.equal(f.get_tensor(f"unet.{k}"), t) for k, t in unet.items())  # the same bytes
    meta = header.metadata
    assert meta["vqdm.format"] == "vqdm-artifact-file" and meta["vqdm.format_version"] == "1"
    assert meta[MANIFEST_KEY] == (FOLDER / MANIFEST_FILE).read_text()  # byte for byte: same manifest sha256
    files = json.loads(meta[FILES_KEY])
    assert {"model_index.json", "unet/config.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
            "tokenizer_2/tokenizer_config.json", "vae/config.json"} <= set(files)
    assert set(json.loads(meta[HASHES_KEY])["tensors"]) == set(header.tensors)
    assert exported.file_bytes == exported.path.stat().st_size
    assert exported.file_bytes < exported.dense_fp16_bytes
    info = inspect_artifact(exported.path)
    assert info["integrity"] == "ok" and info["manifest_sha256"] == inspect_artifact(FOLDER)["manifest_sha256"]
    assert (info["file_bytes"], info["dense_fp16_file_bytes"]) == (exported.file_bytes, exported.dense_fp16_bytes)
    assert is_artifact_file(exported.path) and not is_artifact_file(FOLDER / WEIGHTS_FILE)


def test_tampered_tensor_is_refused_unless_verify_is_off(exported, tmp_path):
    path = _copy(exported, tmp_path)
    entry = read_safetensors_header(path).tensors["unet.conv_in.weight"]
    data = bytearray(path.read_bytes())
    data[entry.start] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"copy\.safetensors: tensor 'unet\.conv_in\.weight': sha256 does not "
                                            r"match the one recorded at export"):
        load_artifact(path)
    assert "FAILED" in inspect_artifact(path)["integrity"]
    # --no-verify-artifacts skips the hashes (not the layout): it loads what is there
    assert load_pipeline(path, verify=False).unet is not None


def test_truncated_file_is_refused(exported, tmp_path):
    path = _copy(exported, tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"copy\.safetensors: truncated: its header declares [\d,]+ bytes, "
                                            r"the file has [\d,]+"):
        load_artifact(path, verify=False)
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        load_vq_unet(path)


def test_foreign_files_are_refused(exported, tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(plain), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match=r"plain\.safetensors: not a vqdm artifact file"):
        load_artifact(plain)
    with pytest.raises(ArtifactError, match=r"plain\.safetensors: not a vqdm artifact file"):
        inspect_artifact(plain)
    pickle = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, pickle)
    with pytest.raises(ArtifactError, match=r"model\.ckpt: not a safetensors file"):
        load_vq_unet(pickle)
    assert not is_artifact_file(plain) and not is_artifact_file(pickle)


def test_edited_metadata_is_refused(exported, tmp_path):
    def more_codebooks(meta):
        _edit_json(meta, MANIFEST_KEY, lambda m: m["quantization"].update(num_codebooks=3))

    path = _resave(exported.path, tmp_path / "k3.safetensors", more_codebooks)
    with pytest.raises(ArtifactError, match=r"k3\.safetensors: metadata vqdm\.manifest: sha256 does not match"):
        load_artifact(path)

    def relu(meta):
        _edit_json(meta, FILES_KEY, lambda f: f.update({"vae/config.json": f["vae/config.json"].replace("silu", "relu")}))

    path = _resave(exported.path, tmp_path / "relu.safetensors", relu)
    with pytest.raises(ArtifactError, match=r"embedded vae/config\.json: sha256 does not match"):
        load_artifact(path)

    def escape(meta):
        _edit_json(meta, FILES_KEY, lambda f: f.update({"tokenizer/../../evil.json": "{}"}))

    path = _resave(exported.path, tmp_path / "escape.safetensors", escape)
    with pytest.raises(ArtifactError, match=r"embedded file 'tokenizer/\.\./\.\./evil\.json' is not a plain file"):
        load_artifact(path, verify=False)


def test_names_and_shapes_are_checked_against_the_configs(exported, tmp_path):
    """Files whose hashes were re-recorded to match (a consistent but wrong file): the checks of
    names and shapes against the configs still refuse them, with or without hashing."""
    def drop(tensors, meta):
        del tensors["vae.decoder.conv_out.bias"]
        _edit_json(meta, HASHES_KEY, lambda h: h["tensors"].pop("vae.decoder.conv_out.bias"))

    path = _resave(exported.path, tmp_path / "drop.safetensors", edit_tensors=drop)
    with pytest.raises(ArtifactError, match=r"drop\.safetensors: 1 tensor\(s\) missing, e\.g\. 'decoder\.conv_out\.bias'"):
        load_artifact(path)

    def stray(tensors, meta):
        tensors["lora.up"] = torch.zeros(1)
        _edit_json(meta, HASHES_KEY, lambda h: h["tensors"].update({"lora.up": "0" * 64}))

    path = _resave(exported.path, tmp_path / "stray.safetensors", edit_tensors=stray)
    with pytest.raises(ArtifactError, match=r"tensor 'lora\.up' has no component prefix"):
        load_artifact(path, verify=False)

    def wider(meta):
        _edit_json(meta, FILES_KEY, lambda f: f.update({"text_encoder/config.json": json.dumps(
            {**json.loads(f["text_encoder/config.json"]), "hidden_size": 48})}))

    path = _resave(exported.path, tmp_path / "wider.safetensors", wider)
    with pytest.raises(ArtifactError, match=r"wider\.safetensors: tensor '.*' has shape .* the config needs"):
        load_artifact(path, verify=False)


def test_commands_take_the_file(exported, tmp_path, capsys):
    out = tmp_path / "again.safetensors"
    assert main(["export", str(FOLDER), "--single-file", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}: " in said and f"{out.stat().st_size:,} bytes" in said and "dense fp16 file" in said
    assert out.read_bytes() == exported.path.read_bytes()  # the export is deterministic
    assert main(["export", str(FOLDER), "--single-file", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(DIGITS_MODEL_DIR), "--single-file", str(tmp_path / "x.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a vqdm artifact" in err
    assert main(["export", str(exported.path), "--single-file", str(tmp_path / "y.safetensors")]) == 1
    assert "already a file" in capsys.readouterr().err
    assert main(["export", str(FOLDER), "--single-file", str(FOLDER / "unet" / "z.safetensors")]) == 1
    assert "inside the artifact folder" in capsys.readouterr().err and not (FOLDER / "unet" / "z.safetensors").exists()
    assert main(["inspect", str(out)]) == 0
    said = capsys.readouterr().out
    assert "single file:" in said and "integrity:    ok" in said


def test_distill_eval_and_server_take_the_file(exported):
    from vqdm.quantizer.distill.checkpoint import DistillCheckpoint
    from vqdm.quantizer.distill.checks import check_inputs
    from vqdm.quantizer.evaluate.run import load_candidate_unet
    from vqdm.server.loader import load_model
    from vqdm.server.settings import ModelSpec, Settings

    from vqdm.errors import ModelFolderError
    from vqdm.quantizer.quantize.run import _check_model

    out = exported.path.parent / "distilled"
    ckpt = DistillCheckpoint.for_output(out)
    manifest = check_inputs(DIGITS_MODEL_DIR, exported.path, out, ckpt, False, False)
    assert manifest["base_model"]["unet_sha256"]  # checked against the teacher's U-Net
    with pytest.raises(ModelFolderError, match="is a vqdm artifact"):  # a teacher must be dense
        check_inputs(exported.path, exported.path, out, ckpt, False, False)
    with pytest.raises(ModelFolderError, match="already a vqdm artifact"):  # so must quantize's input
        _check_model(exported.path, "sdxl")
    _, info = load_candidate_unet(exported.path, torch.float32, "cpu")
    assert info["kind"] == "vq" and info["num_codebooks"] == 2
    served = load_model(ModelSpec("digits", exported.path), Settings(), ["cpu"])
    assert served.family == "sdxl" and served.quantization["num_codebooks"] == 2
    assert served.weight_bytes == load_model(ModelSpec("digits", FOLDER), Settings(), ["cpu"]).weight_bytes


def test_fp32_components_export_as_they_are_or_rounded_to_fp16(both, tmp_path):
    """An artifact with its own fp32 components (not shared): by default the file holds them as
    they are and loads as the folder; with components_fp16 they are rounded, the U-Net untouched."""
    from vqdm.models.artifact import save_artifact

    pipe = both[0]  # the digits artifact loaded in fp32, saved with its components
    art = save_artifact(pipe, tmp_path / "art", {"base_model": pipe.vqdm_manifest["base_model"]})
    same = export_single_file(art, tmp_path / "same.safetensors")
    half = export_single_file(art, tmp_path / "half.safetensors", components_fp16=True)
    folder, a, b = load_artifact(art), load_artifact(same.path), load_artifact(half.path)
    for comp in ("unet", "text_encoder", "text_encoder_2", "vae"):
        ref, exact, rounded = (getattr(x, comp).state_dict() for x in (folder, a, b))
        assert all(torch.equal(ref[k], exact[k]) for k in ref), comp
        assert all(torch.equal(ref[k].half().to(ref[k].dtype) if comp != "unet" else ref[k], rounded[k]) for k in ref)
    dtypes = {e.dtype for k, e in read_safetensors_header(half.path).tensors.items() if not k.startswith("unet.")}
    assert dtypes == {"F16"} and "F32" in {e.dtype for e in read_safetensors_header(same.path).tensors.values()}
    assert half.file_bytes < same.file_bytes and half.dense_fp16_bytes == same.dense_fp16_bytes
    assert inspect_artifact(half.path)["integrity"] == "ok"
