"""A vqdm artifact as one .safetensors file (`vqdm export ARTIFACT --single-file FILE`, SPEC §6).

Tensors, each under its component's prefix, exactly as the artifact folder stores them (same
dtype, same bytes):

    unet.<name>             unet/vqdm.safetensors: <layer>.codes uint8, <layer>.codebooks and
                            <layer>.scales fp16 (fp32 where the artifact kept them), every other
                            U-Net tensor fp16
    text_encoder.<name>     text_encoder/model.safetensors (of the artifact, or of the components
    text_encoder_2.<name>   text_encoder_2/model.safetensors   folder it shares)
    vae.<name>              vae/diffusion_pytorch_model.safetensors

Header metadata (safetensors holds strings; every vqdm.* value but the first two is JSON):

    vqdm.format          "vqdm-artifact-file"
    vqdm.format_version  "1"
    vqdm.manifest        the folder's unet/manifest.json byte for byte (format version, K/B/g,
                         subsets, layers with their errors, base model, the folder's file hashes):
                         `vqdm inspect` prints the same manifest sha256 for file and folder
    vqdm.files           {path: text}: the other files a pipeline load reads, model_index.json,
                         unet/config.json, scheduler/, tokenizer/, tokenizer_2/ and the .json
                         configs of text_encoder/, text_encoder_2/, vae/
    vqdm.hashes          {"manifest": sha256, "files": {path: sha256}, "tensors": {key: sha256}};
                         a tensor's sha256 covers "<dtype> <shape>\\n" and then its bytes

Loading checks what loading the folder checks, and refuses with `ArtifactError(file, reason)`:
the file's length against its header (truncation), format and version, the manifest, every
recorded hash (skipped with `verify=False`, i.e. `--no-verify-artifacts`), every tensor's name and
shape against the configs. No pickles: the embedded files are text, written only into a private
temporary folder for the tokenizers and scheduler to read, under names checked first.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from vqdm.errors import ArtifactError
from vqdm.models.artifact import (COMPONENTS, CONFIG_FILE, WEIGHTS_FILE, _HASH_CHUNK, _make_readable, _plan_from_config,
                                  check_manifest, check_tensors, components_dir, fill_vq_unet, inspect_summary,
                                  quantized_subsets, read_manifest, verify_files, vq_unet_skeleton)
from vqdm.models.safetensors_header import (DTYPE_BYTES, FLOAT_DTYPES, SafetensorsFormatError, SafetensorsHeader,
                                            TensorEntry, encode_header, is_pickle_name, nbytes)
from vqdm.models.safetensors_header import read_safetensors_header as read_header
from vqdm.vq_format import CODE_DTYPE

FILE_FORMAT = "vqdm-artifact-file"
FILE_FORMAT_VERSION = 1
FORMAT_KEY = "vqdm.format"
VERSION_KEY = "vqdm.format_version"
MANIFEST_KEY = "vqdm.manifest"
FILES_KEY = "vqdm.files"
HASHES_KEY = "vqdm.hashes"
PIPELINE_CLASS = "StableDiffusionXLPipeline"
UNET_PREFIX = "unet"
# The components with weights: (library, class) model_index.json must name, and their weights' file stem.
MODEL_COMPONENTS = {
    "text_encoder": (("transformers", "CLIPTextModel"), "model"),
    "text_encoder_2": (("transformers", "CLIPTextModelWithProjection"), "model"),
    "vae": (("diffusers", "AutoencoderKL"), "diffusion_pytorch_model"),
}
TEXT_SUFFIXES = (".json", ".txt")  # configs and tokenizer files: what a pipeline load reads besides weights
REQUIRED_FILES = ("model_index.json", CONFIG_FILE, "scheduler/scheduler_config.json",
                  *(f"{c}/config.json" for c in MODEL_COMPONENTS))
# An embedded file's path: model_index.json, or one plain file name inside a component folder.
_FILE_PATH = re.compile(r"^(model_index\.json|(unet|%s)/[A-Za-z0-9_][A-Za-z0-9._-]*)$" % "|".join(COMPONENTS))


# -- the safetensors container (vqdm.models.safetensors_header), its errors as ArtifactError --------
def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """The checked header of a .safetensors file (vqdm.models.safetensors_header), refused as ArtifactError."""
    try:
        return read_header(path)
    except SafetensorsFormatError as e:
        raise ArtifactError(e.path, e.reason) from None


def _file_chunks(f, entry: TensorEntry) -> Iterator[bytes]:
    """The bytes of `entry` read from the open file `f`, in chunks."""
    f.seek(entry.start)
    left = entry.end - entry.start
    while left:
        chunk = f.read(min(_HASH_CHUNK, left))
        if not chunk:
            raise ArtifactError(f.name, "shorter than its header says (changed while being read?)")
        yield chunk
        left -= len(chunk)


def tensor_sha256(dtype: str, shape: tuple[int, ...], chunks: Iterable[bytes]) -> str:
    """sha256 of "<dtype> <shape>\n" and then the tensor's bytes."""
    h = hashlib.sha256(f"{dtype} {list(shape)}\n".encode())
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class _Source:
    """One tensor to export: `name` in the safetensors file `path`, written as `key`, its bytes
    copied as they are, or (`half`) an fp32 tensor rounded to fp16."""
    key: str
    path: Path
    name: str
    entry: TensorEntry
    half: bool = False

    @property
    def dtype(self) -> str:
        return "F16" if self.half else self.entry.dtype

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.entry.shape)

    def chunks(self, handles: dict) -> Iterator[bytes]:
        if not self.half:
            f = handles.get(self.path) or handles.setdefault(self.path, open(self.path, "rb"))
            yield from _file_chunks(f, self.entry)
            return
        with safe_open(str(self.path), framework="pt") as f:
            yield f.get_tensor(self.name).to(torch.float16).contiguous().numpy().tobytes()


def _write_safetensors(out: Path, sources: list[_Source], metadata: dict[str, str]) -> None:
    """A .safetensors file of `sources`, streamed one tensor at a time. Widest dtypes first, so every
    tensor starts aligned to its element size (as safetensors itself writes)."""
    order = sorted(sources, key=lambda s: -DTYPE_BYTES[s.dtype])
    raw = encode_header([(s.key, s.dtype, s.entry.shape) for s in order], metadata)
    handles: dict[Path, BinaryIO] = {}
    try:
        with open(out, "wb") as dst:
            dst.write(raw)
            for s in order:
                for chunk in s.chunks(handles):
                    dst.write(chunk)
    finally:
        for f in handles.values():
            f.close()


# -- export ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult:
    path: Path
    file_bytes: int
    dense_fp16_bytes: int  # the same model as a dense fp16 file: 2 bytes per parameter (computed)


def export_single_file(artifact: str | Path, out: str | Path, overwrite: bool = False,
                       components_fp16: bool = False) -> ExportResult:
    """Write the artifact folder `artifact` as one .safetensors file `out` (layout: module docstring).
    The folder is verified first (every hash), so only an intact artifact is exported; the file is
    assembled next to `out` and renamed into place. `components_fp16` rounds the fp32 tensors of the
    text encoders and VAE to fp16 (as single-file SDXL checkpoints store them); by default every
    tensor keeps the folder's bytes, and the file loads exactly as the folder does."""
    artifact, out = Path(artifact), Path(out)
    if artifact.is_file():
        raise ArtifactError(artifact, "already a file; `vqdm export` takes an artifact folder")
    if is_pickle_name(out):
        raise ArtifactError(out, f"a {out.suffix} name, which vqdm takes for a pickle and refuses to read: name "
                                 "the file .safetensors")
    manifest = read_manifest(artifact)  # refuses what is not an artifact folder
    if artifact.resolve() in out.resolve().parents:
        raise ArtifactError(out, "inside the artifact folder (a file it does not list would make it fail its "
                                 "checks): write the single file elsewhere")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (use --force to overwrite)")
    verify_files(artifact, manifest)
    comps = components_dir(artifact, manifest)
    manifest_text = (artifact / "unet" / "manifest.json").read_text()
    files = _text_files(artifact, comps)
    sources = _weight_sources(artifact, comps, components_fp16)
    hashes = {"manifest": _sha256_text(manifest_text),
              "files": {rel: _sha256_text(text) for rel, text in files.items()},
              "tensors": _source_hashes(sources)}
    metadata = {FORMAT_KEY: FILE_FORMAT, VERSION_KEY: str(FILE_FORMAT_VERSION), MANIFEST_KEY: manifest_text,
                FILES_KEY: json.dumps(files, sort_keys=True), HASHES_KEY: json.dumps(hashes, sort_keys=True)}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write_safetensors(tmp, sources, metadata)
        _make_readable(tmp)
        check_artifact_file(tmp, verify=False)  # what was written reads back: names, shapes, lengths
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportResult(out, out.stat().st_size, dense_fp16_bytes(manifest, read_safetensors_header(out), files))


def _text_files(artifact: Path, comps: Path) -> dict[str, str]:
    """{path: text} of every config and tokenizer file a pipeline load reads (weights aside)."""
    paths = {"model_index.json": artifact / "model_index.json", CONFIG_FILE: artifact / CONFIG_FILE}
    for comp in COMPONENTS:
        for f in sorted((comps / comp).iterdir()):
            if f.is_file() and f.suffix in TEXT_SUFFIXES and not f.name.endswith(".index.json"):
                paths[f"{comp}/{f.name}"] = f
    texts = {}
    for rel, f in paths.items():
        try:
            texts[rel] = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ArtifactError(f, "not UTF-8 text: an artifact file embeds configs and tokenizer files as text") from None
    return texts


def _weight_sources(artifact: Path, comps: Path, components_fp16: bool) -> list[_Source]:
    """Every tensor to export: the U-Net's as stored, then each component's weights as diffusers
    loads them (one file, or the shards its index lists; no variants), fp32 ones rounded to fp16
    with `components_fp16`."""
    by_prefix = {UNET_PREFIX: [artifact / WEIGHTS_FILE]}
    for comp, (_, stem) in MODEL_COMPONENTS.items():
        folder = comps / comp
        single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
        if single.is_file():
            by_prefix[comp] = [single]
        elif index.is_file():
            by_prefix[comp] = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        else:
            raise ArtifactError(folder, f"no {stem}.safetensors (nor a sharded index): vqdm exports safetensors weights only")
    sources, seen = [], set()
    for prefix, paths in by_prefix.items():
        for src in paths:
            for name, e in read_safetensors_header(src).tensors.items():
                key = f"{prefix}.{name}"
                if key in seen:
                    raise ArtifactError(src, f"tensor {name!r} is in more than one shard")
                seen.add(key)
                sources.append(_Source(key, src, name, e, components_fp16 and prefix != UNET_PREFIX and e.dtype == "F32"))
    return sources


def _source_hashes(sources: list[_Source]) -> dict[str, str]:
    handles: dict[Path, BinaryIO] = {}
    try:
        return {s.key: tensor_sha256(s.dtype, s.entry.shape, s.chunks(handles)) for s in sources}
    finally:
        for f in handles.values():
            f.close()


def dense_fp16_bytes(manifest: dict, header: SafetensorsHeader, files: dict[str, str]) -> int:
    """Bytes of the same model as a dense fp16 file, computed: the U-Net's parameters from its
    config (as `vqdm plan` counts them), the components' tensors from the header, 2 bytes per
    floating-point value (other dtypes as stored); the header itself is not counted."""
    q = manifest["quantization"]
    unet = _plan_from_config(json.loads(files[CONFIG_FILE]), q["num_codebooks"], q["group_size"],
                             quantized_subsets(manifest)).dense_fp16_bytes
    rest = sum(2 * math.prod(e.shape) if e.dtype in FLOAT_DTYPES else e.end - e.start
               for key, e in header.tensors.items() if not key.startswith(UNET_PREFIX + "."))
    return unet + rest


# -- reading -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArtifactFile:
    path: Path
    header: SafetensorsHeader
    manifest: dict
    files: dict[str, str]  # embedded path -> text
    hashes: dict

    def json(self, rel: str) -> dict:
        """An embedded JSON file, parsed."""
        try:
            value = json.loads(self.files[rel])
        except json.JSONDecodeError as e:
            raise ArtifactError(self.path, f"embedded {rel} is not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise ArtifactError(self.path, f"embedded {rel} is not a JSON object")
        return value


def is_artifact_file(path: str | Path) -> bool:
    """A file whose safetensors metadata carries a vqdm manifest (anything else: False, no error)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return MANIFEST_KEY in read_safetensors_header(path).metadata
    except (ArtifactError, OSError):
        return False


def _metadata_json(path: Path, metadata: dict[str, str], key: str, kind: type):
    if key not in metadata:
        raise ArtifactError(path, f"safetensors metadata lacks {key!r}: not a complete vqdm artifact file")
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise ArtifactError(path, f"metadata {key} is not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise ArtifactError(path, f"metadata {key} must be a JSON {kind.__name__}")
    return value


def open_artifact_file(path: str | Path) -> ArtifactFile:
    """The header, manifest and embedded files of an artifact file, checked for form (no hashing)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(path, "no such artifact file")
    header = read_safetensors_header(path)
    meta = header.metadata
    if meta.get(FORMAT_KEY) != FILE_FORMAT or MANIFEST_KEY not in meta:
        raise ArtifactError(path, "not a vqdm artifact file: its safetensors metadata has no vqdm manifest "
                                  "(make one from an artifact folder with `vqdm export DIR --single-file FILE`)")
    if meta.get(VERSION_KEY) != str(FILE_FORMAT_VERSION):
        raise ArtifactError(path, f"artifact file version {meta.get(VERSION_KEY)!r}, this vqdm reads version "
                                  f"{FILE_FORMAT_VERSION} (written by a newer vqdm? upgrade vqdm)")
    manifest = check_manifest(_metadata_json(path, meta, MANIFEST_KEY, dict), f"{path} (metadata {MANIFEST_KEY})")
    files = _metadata_json(path, meta, FILES_KEY, dict)
    hashes = _metadata_json(path, meta, HASHES_KEY, dict)
    bad = [rel for rel, text in files.items() if not _FILE_PATH.match(rel) or not isinstance(text, str)]
    if bad:
        raise ArtifactError(path, f"embedded file {bad[0]!r} is not a plain file of a pipeline component")
    missing = [rel for rel in REQUIRED_FILES if rel not in files]
    if missing:
        raise ArtifactError(path, f"embedded file {missing[0]} is missing")
    af = ArtifactFile(path, header, manifest, files, hashes)
    index = af.json("model_index.json")
    if index.get("_class_name") != PIPELINE_CLASS:
        raise ArtifactError(path, f"embedded model_index.json names pipeline {index.get('_class_name')!r}, "
                                  f"an artifact file holds a {PIPELINE_CLASS}")
    for comp, (cls, _) in MODEL_COMPONENTS.items():
        if list(index.get(comp) or []) != list(cls):
            raise ArtifactError(path, f"embedded model_index.json names {index.get(comp)!r} for {comp}, "
                                      f"an artifact file holds {cls[0]} {cls[1]}")
    return af


def read_file_manifest(path: str | Path) -> dict:
    """The manifest of an artifact file (its form checked, no hashing): `read_manifest` of a file."""
    return open_artifact_file(path).manifest


def embedded_json(path: str | Path, rel: str) -> dict:
    """One embedded JSON file (model_index.json, unet/config.json, scheduler/scheduler_config.json...)."""
    return open_artifact_file(path).json(rel)


def verify_hashes(af: ArtifactFile) -> None:
    """Every hash recorded at export against the file: the manifest, each embedded file, each tensor."""
    path, recorded = af.path, af.hashes
    if not isinstance(recorded.get("files"), dict) or not isinstance(recorded.get("tensors"), dict):
        raise ArtifactError(path, f"metadata {HASHES_KEY} lacks its 'files' or 'tensors' section")
    if recorded.get("manifest") != _sha256_text(af.header.metadata[MANIFEST_KEY]):
        raise ArtifactError(path, f"metadata {MANIFEST_KEY}: sha256 does not match the one recorded at export: edited")
    _same_names(path, "embedded file", set(af.files), set(recorded["files"]))
    _same_names(path, "tensor", set(af.header.tensors), set(recorded["tensors"]))
    for rel, text in af.files.items():
        if _sha256_text(text) != recorded["files"][rel]:
            raise ArtifactError(path, f"embedded {rel}: sha256 does not match the one recorded at export: edited")
    with open(path, "rb") as f:
        for key, e in af.header.tensors.items():
            if tensor_sha256(e.dtype, e.shape, _file_chunks(f, e)) != recorded["tensors"][key]:
                raise ArtifactError(path, f"tensor {key!r}: sha256 does not match the one recorded at export: "
                                          "file corrupted or edited")


def _same_names(path: Path, what: str, present: set[str], recorded: set[str]) -> None:
    if present - recorded:
        raise ArtifactError(path, f"{what} {sorted(present - recorded)[0]!r} was not there at export (added later)")
    if recorded - present:
        raise ArtifactError(path, f"{what} {sorted(recorded - present)[0]!r} recorded at export is missing")


def _component_skeleton(af: ArtifactFile, comp: str):
    """Component `comp` built from its embedded config on the meta device (shapes only)."""
    import transformers
    from diffusers import AutoencoderKL

    config = af.json(f"{comp}/config.json")
    try:
        with torch.device("meta"):
            if comp == "vae":
                return AutoencoderKL.from_config(config)
            cls = getattr(transformers, MODEL_COMPONENTS[comp][0][1])
            return cls(cls.config_class.from_dict(config))
    except (TypeError, ValueError, KeyError) as e:
        raise ArtifactError(af.path, f"embedded {comp}/config.json is not a usable config ({e})") from None


def _found(af: ArtifactFile, prefix: str) -> dict[str, tuple[tuple[int, ...], str]]:
    cut = len(prefix) + 1
    return {key[cut:]: (e.shape, e.dtype) for key, e in af.header.tensors.items() if key.startswith(prefix + ".")}


def check_artifact_file(path: str | Path, verify: bool = True):
    """(ArtifactFile, the VQ U-Net skeleton, {component: skeleton}) once the file passed every check:
    form, hashes (with `verify`), and every tensor's name and shape against the configs."""
    af = open_artifact_file(path)
    if verify:
        verify_hashes(af)
    prefixes = (UNET_PREFIX, *MODEL_COMPONENTS)
    stray = [key for key in af.header.tensors if key.split(".", 1)[0] not in prefixes or "." not in key]
    if stray:
        raise ArtifactError(af.path, f"tensor {stray[0]!r} has no component prefix ({', '.join(p + '.' for p in prefixes)})")
    unet = vq_unet_skeleton(af.json(CONFIG_FILE), af.manifest, f"{af.path} (embedded {CONFIG_FILE})",
                            f"{af.path} (metadata {MANIFEST_KEY})")
    check_tensors(af.path, _found(af, UNET_PREFIX), unet.state_dict(), f"the U-Net config ({UNET_PREFIX}.)")
    skeletons = {}
    for comp in MODEL_COMPONENTS:
        skeletons[comp] = _component_skeleton(af, comp)
        check_tensors(af.path, _found(af, comp), skeletons[comp].state_dict(), f"the {comp} config ({comp}.)")
    return af, unet, skeletons


def _read(handle, af: ArtifactFile, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    cut = len(prefix) + 1
    return {key[cut:]: (t if (t := handle.get_tensor(key)).dtype == CODE_DTYPE else t.to(dtype))
            for key in af.header.tensors if key.startswith(prefix + ".")}


def load_vq_unet_file(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      verify: bool = True):
    """(unet, manifest) from an artifact file: `load_vq_unet` of a file."""
    af, unet, _ = check_artifact_file(path, verify)
    try:
        with safe_open(str(af.path), framework="pt") as handle:
            tensors = _read(handle, af, UNET_PREFIX, dtype)
    except SafetensorError as e:
        raise ArtifactError(af.path, f"unreadable safetensors file ({e})") from None
    return fill_vq_unet(unet, tensors, af.path, device), af.manifest


def load_artifact_file(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       verify: bool = True):
    """The StableDiffusionXLPipeline of an artifact file, as `load_artifact` gives it for the folder
    (`pipe.vqdm_manifest` holds the manifest)."""
    import transformers
    from diffusers import StableDiffusionXLPipeline

    af, unet, skeletons = check_artifact_file(path, verify)
    models = {}
    try:
        with safe_open(str(af.path), framework="pt") as handle:
            unet = fill_vq_unet(unet, _read(handle, af, UNET_PREFIX, dtype), af.path, device)
            for comp, skeleton in skeletons.items():
                tensors = _read(handle, af, comp, dtype)
                if comp == "vae":  # tensors already in `dtype` (a .to() would warn about fp32 modules)
                    skeleton.load_state_dict(tensors, strict=True, assign=True)
                    if leftover := [n for n, t in [*skeleton.named_parameters(), *skeleton.named_buffers()] if t.is_meta]:
                        raise ArtifactError(af.path, f"vae tensor(s) not provided by the file, e.g. {leftover[0]!r}")
                    models[comp] = skeleton.eval()
                else:  # transformers fills what the file does not hold (non-persistent buffers) itself
                    cls = getattr(transformers, MODEL_COMPONENTS[comp][0][1])
                    models[comp] = cls.from_pretrained(None, config=skeleton.config, state_dict=tensors, dtype=dtype)
    except SafetensorError as e:
        raise ArtifactError(af.path, f"unreadable safetensors file ({e})") from None
    with tempfile.TemporaryDirectory(prefix="vqdm-artifact-file-") as tmp:
        for rel, text in af.files.items():  # names checked by open_artifact_file: no '..', no absolute path
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_text(text, encoding="utf-8")
        try:
            pipe = StableDiffusionXLPipeline.from_pretrained(tmp, unet=unet, **models, local_files_only=True,
                                                             use_safetensors=True)
        except (OSError, ValueError, EnvironmentError) as e:
            raise ArtifactError(af.path, f"could not load the tokenizers or scheduler: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    pipe.vqdm_manifest = af.manifest
    return pipe.to(device)


def inspect_artifact_file(path: str | Path) -> dict:
    """`inspect_artifact` of a file: the folder's summary, plus the file's size and its dense fp16 size."""
    af = open_artifact_file(path)  # what is not an artifact file is refused, not reported
    try:
        check_artifact_file(path, verify=True)
        integrity = "ok"
    except ArtifactError as e:
        integrity = f"FAILED: {e}"
    info = inspect_summary(af.path, af.manifest, af.json(CONFIG_FILE), integrity,
                           _sha256_text(af.header.metadata[MANIFEST_KEY]))
    info["file_bytes"] = af.header.size
    info["dense_fp16_file_bytes"] = dense_fp16_bytes(af.manifest, af.header, af.files)
    return info
