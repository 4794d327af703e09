"""The vqdm artifact (SPEC §6): a diffusers-layout folder whose unet/ holds the VQ U-Net.

    model_index.json, scheduler/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, vae/
    unet/config.json        diffusers U-Net config
    unet/vqdm.safetensors   <layer>.codes uint8, <layer>.codebooks fp16, <layer>.scales fp16,
                            every other U-Net tensor fp16 under its own name
    unet/manifest.json      format version, quantization, layers, bits, bytes, base model,
                            calibration / distillation settings, tool version, sha256 of every file

An artifact may share its non-U-Net components with the dense folder it was made from instead of
copying them (`save_artifact(..., share_components=True)`, for the small embedded default that
ships beside its dense model): the manifest then names that folder (`components`, a path relative
to the artifact) and lists its files, with their sha256, under paths relative to the artifact
(`../tiny-sdxl-digits/vae/...`), so they are checked like the artifact's own.

Every manifest entry lies inside the artifact, or inside that declared components folder: no
absolute paths, no '..' beyond the declared prefix. No symbolic link is accepted inside either
folder (the folders themselves may be links, e.g. mounts).

`save_artifact` and `load_artifact` are the pair; loading verifies hashes, names and shapes and
raises `ArtifactError(file, reason)` rather than letting torch fail deep inside.
No pickles: safetensors and JSON only.

The same artifact exported as one .safetensors file (`vqdm export --single-file`) lives in
`artifact_file.py`; `read_manifest`, `load_vq_unet`, `load_artifact` and `inspect_artifact` given a
file hand it to that module, so every caller takes either form.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vqdm import __version__
from vqdm.errors import ArtifactError
from vqdm.models.accounting import layer_bits, plan_unet
from vqdm.models.layer_selection import SUBSETS, layers_in_subsets, select_layers, subset_of
from vqdm.models.quantized_unet import replace_with_vq, vq_modules
from vqdm.vq_format import CODE_DTYPE, NBITS, SUPPORTED_NBITS

FORMAT_NAME = "vqdm-artifact"
FORMAT_VERSION = 1
WEIGHTS_FILE = "unet/vqdm.safetensors"
MANIFEST_FILE = "unet/manifest.json"
CONFIG_FILE = "unet/config.json"
COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
_HASH_CHUNK = 1 << 22


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def unet_fingerprint(unet: nn.Module | None = None, source_dir: str | Path | None = None) -> str:
    """sha256 identifying the base U-Net: of its weight files when a folder is given, else of its tensors."""
    h = hashlib.sha256()
    if source_dir is not None:
        files = sorted((Path(source_dir) / "unet").glob("*.safetensors"))
        if not files:
            raise ArtifactError(Path(source_dir) / "unet", "no .safetensors weights to fingerprint")
        for f in files:
            h.update(sha256_file(f).encode())
        return h.hexdigest()
    assert unet is not None
    for name, t in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()


def _tool_version() -> str:
    return __version__


_VQ_FLOATS = (".codebooks", ".scales")


def _unet_tensors(unet: nn.Module, codebook_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """State dict at rest: codes stay uint8, codebooks and scales become `codebook_dtype`, every other
    float tensor fp16."""
    out = {}
    for name, t in unet.state_dict().items():
        t = t.detach().to("cpu")
        if t.dtype != CODE_DTYPE:
            t = t.to(codebook_dtype if name.endswith(_VQ_FLOATS) else torch.float16)
        out[name] = t.contiguous()
    return out


def _write_components(pipe, tmp: Path, source_dir: Path | None) -> None:
    if source_dir is not None:
        for name in COMPONENTS:
            shutil.copytree(source_dir / name, tmp / name)
        shutil.copy2(source_dir / "model_index.json", tmp / "model_index.json")
        return
    for name in COMPONENTS:
        getattr(pipe, name).save_pretrained(tmp / name)
    pipe.save_config(tmp)  # model_index.json


def save_artifact(pipe, out_dir: str | Path, manifest_fields: dict[str, Any], *,
                  source_dir: str | Path | None = None, overwrite: bool = False,
                  codebook_dtype: torch.dtype = torch.float16, share_components: bool = False) -> Path:
    """Write `pipe` (with VQ layers in its U-Net) as an artifact folder.

    `manifest_fields` holds what only the caller knows: "quantization" (num_codebooks, nbits,
    group_size, method), "layers" stats by name (rel_error, bits, seconds), "base_model" (name,
    unet_sha256), and optionally "calibration" / "distillation". The folder is assembled next to
    `out_dir` and renamed into place, so an interrupted write never looks like a finished artifact.

    `codebook_dtype` float32 keeps codebooks and scales exactly as the quantizer made them (SPEC §6
    stores fp16; the embedded default keeps fp32 so it serves what start-up quantization served).
    `share_components` lists `source_dir`'s components with their hashes instead of copying them.
    """
    out_dir = Path(out_dir)
    if share_components and source_dir is None:
        raise ValueError("share_components needs the source_dir whose components the artifact shares")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (use --force to overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        shared = {}
        if share_components:
            components = Path(os.path.relpath(Path(source_dir).resolve(), out_dir.resolve()))
            shared = {str(components / rel): sha256_file(Path(source_dir) / rel)
                      for rel in _component_files(Path(source_dir))}
            shutil.copy2(Path(source_dir) / "model_index.json", tmp / "model_index.json")  # what tools read first
        else:
            _write_components(pipe, tmp, Path(source_dir) if source_dir else None)
        unet = pipe.unet
        (tmp / "unet").mkdir()
        unet.save_config(tmp / "unet")
        save_file(_unet_tensors(unet, codebook_dtype), str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        manifest = _manifest(unet, manifest_fields, tmp, codebook_dtype)
        if share_components:
            # The shared components' hashes join the artifact's own: verify_files checks them alike.
            files = manifest.pop("files")
            manifest["components"] = str(components)
            manifest["files"] = files | shared
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        _make_readable(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _layer_entries(layers: list[tuple[str, nn.Module]], stats: dict[str, dict]) -> list[dict]:
    """The manifest's "layers": shape and bits of every VQ layer, then the caller's stats for it."""
    entries = []
    for name, m in layers:
        entry = {"name": name, "type": "conv2d" if hasattr(m, "kernel_size") else "linear", "n": m.n, "d": m.d,
                 "bits": layer_bits(m.n, m.d, m.num_codebooks, m.nbits, m.group_size)}
        entry.update({kk: v for kk, v in stats.get(name, {}).items() if kk not in entry})
        entries.append(entry)
    return entries


def _manifest(unet: nn.Module, manifest_fields: dict[str, Any], tmp: Path, codebook_dtype: torch.dtype) -> dict:
    """unet/manifest.json for the artifact assembled in `tmp` (every other file already written)."""
    q = dict(manifest_fields.get("quantization", {}))
    layers = vq_modules(unet)
    if not layers:
        raise ValueError("the pipeline's U-Net has no VQ layers: quantize it before saving an artifact")
    first = layers[0][1]
    subsets = _whole_subsets(unet, [n for n, _ in layers])
    q.setdefault("method", "aq")
    q.update(num_codebooks=first.num_codebooks, nbits=first.nbits, group_size=first.group_size, subsets=subsets,
             codebook_dtype=str(codebook_dtype).removeprefix("torch."))
    layer_list = _layer_entries(layers, manifest_fields.get("layers", {}))
    plan = _plan_from_config(unet.config, first.num_codebooks, first.group_size, subsets)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool": {"name": "vqdm", "version": _tool_version()},
        "quantization": q,
        "bits_per_weight": {"quantized": plan.bits_per_weight_quantized, "unet": plan.bits_per_weight_unet},
        "bytes": {"unet_stored": plan.unet_bytes, "dense_fp16": plan.dense_fp16_bytes,
                  "dense_fp32": plan.dense_fp32_bytes,
                  "weights_file": (tmp / WEIGHTS_FILE).stat().st_size},
        "base_model": manifest_fields.get("base_model", {}),
        "calibration": manifest_fields.get("calibration"),
        "distillation": manifest_fields.get("distillation"),
        "layers": layer_list,
    }
    manifest["files"] = {
        str(p.relative_to(tmp)): sha256_file(p)
        for p in sorted(tmp.rglob("*")) if p.is_file() and str(p.relative_to(tmp)) != MANIFEST_FILE
    }
    return manifest


def _make_readable(root: Path) -> None:
    # mkdtemp and safetensors create owner-only entries; artifacts are shared read-only mounts.
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


_LINK_REASON = "a symbolic link inside the artifact: vqdm refuses links there (copy the file or folder in)"


def _tree_files(root: Path, tops: list[str] | None = None) -> list[str]:
    """The files under `root` (or under its entries `tops`), as POSIX paths relative to it. A
    symbolic link anywhere in there is refused: a linked folder hides its files from the check of
    what is listed, and a link can point anywhere."""
    out = []
    for top in tops if tops is not None else [""]:
        start = root / top
        if top and start.is_symlink():  # the root itself may be a link (a mount); nothing inside it
            raise ArtifactError(start, _LINK_REASON)
        if start.is_file():
            out.append(top)
            continue
        for folder, dirs, files in os.walk(start):  # never follows links: each is refused instead
            for name in dirs + files:
                p = Path(folder, name)
                if p.is_symlink():
                    raise ArtifactError(p, _LINK_REASON)
                if name in files:
                    out.append(p.relative_to(root).as_posix())
    return sorted(out)


def _component_files(folder: Path) -> list[str]:
    """The files a pipeline load reads from `folder` besides the U-Net: model_index.json and the components."""
    return _tree_files(folder, ["model_index.json", *COMPONENTS])


def _shared_prefix(path: Path, manifest: dict) -> str | None:
    """The manifest's `components` folder as written (a normalized relative path), or None."""
    shared = manifest.get("components")
    if shared is None:
        return None
    if not isinstance(shared, str) or not shared or Path(shared).is_absolute() or os.path.normpath(shared) != shared \
            or shared == ".":
        raise ArtifactError(path / MANIFEST_FILE, f"components {shared!r} must be a normalized path relative to the "
                                                  "artifact (e.g. '../sdxl-base')")
    return shared


def components_dir(path: str | Path, manifest: dict) -> Path:
    """The folder the non-U-Net components load from: the artifact itself, or the folder it shares them with."""
    path = Path(path)
    shared = _shared_prefix(path, manifest)
    if shared is None:
        return path
    folder = path / shared
    if not (folder / "model_index.json").is_file():
        raise ArtifactError(folder, "the folder whose components this artifact shares is missing (no model_index.json)")
    return folder


def _listed_path(path: Path, shared: str | None, rel) -> Path:
    """Where manifest entry `rel` is: inside the artifact, or inside the components folder it
    declares (entries there start with that folder's relative path). No other place: an entry
    is a plain relative path, written the one way (no '.', '..', '//', trailing '/')."""
    if not isinstance(rel, str):
        raise ArtifactError(path / MANIFEST_FILE, f"file entry {rel!r} is not a path")
    root, inner = path, rel
    if shared is not None and rel.startswith(shared + "/"):
        root, inner = path / shared, rel[len(shared) + 1:]
    if any(part in ("", ".", "..") for part in inner.split("/")):  # "" also catches an absolute path
        raise ArtifactError(path / MANIFEST_FILE, f"file entry {rel!r} is not a plain path inside the artifact or "
                                                  "its declared components folder (absolute paths and '..', '.' or "
                                                  "empty parts are refused)")
    return root / inner


def _whole_subsets(unet: nn.Module, vq_names: list[str]) -> list[str]:
    """The subsets (calibration order) the VQ layers cover; each must be covered whole.

    A partly quantized artifact (`vqdm quantize --subsets`) keeps whole subsets dense, so the
    manifest can name what is VQ by subset and the loader can rebuild exactly that.
    """
    vq = set(vq_names)
    subsets = [s for s in SUBSETS if any(subset_of(n) == s for n in vq)]
    dense = [n for n, _ in layers_in_subsets(select_layers(unet), subsets)]
    if dense:
        raise ValueError(f"subset {subset_of(dense[0])} is only partly quantized ({dense[0]} is dense): "
                         "an artifact quantizes whole subsets")
    return subsets


def quantized_subsets(manifest: dict) -> list[str]:
    """The subsets an artifact quantized; artifacts from before `--subsets` quantized all seven."""
    return list(manifest["quantization"].get("subsets", SUBSETS))


def _plan_from_config(config: dict, num_codebooks: int, group_size: int, subsets=SUBSETS):
    from diffusers import UNet2DConditionModel  # deferred: seconds to import; the CLI parser loads vqdm.models

    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(dict(config))
    return plan_unet(meta, num_codebooks, NBITS, group_size, subsets)


def read_manifest(path: str | Path) -> dict:
    """Parse and sanity-check unet/manifest.json (no hashing); of an artifact file (`vqdm export
    --single-file`), its header's manifest."""
    path = Path(path)
    if path.is_file():
        from vqdm.models.artifact_file import read_file_manifest  # that module builds on this one

        return read_file_manifest(path)
    mf = path / MANIFEST_FILE
    if not path.is_dir():
        raise ArtifactError(path, "no such artifact folder or file")
    if not mf.is_file():
        raise ArtifactError(mf, "missing: not a vqdm artifact (no unet/manifest.json)")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(mf, f"not valid JSON ({e})") from None
    return check_manifest(manifest, mf)


def check_manifest(manifest, where: str | Path) -> dict:
    """`manifest` if it is one this vqdm reads (format, version, sections, quantization); `where`
    names it in the error."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(where, f"not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise ArtifactError(where, f"format version {version!r}, this vqdm reads version {FORMAT_VERSION}"
                                   + (": written by a newer vqdm? upgrade vqdm" if newer else ""))
    for key in ("quantization", "layers", "files"):
        if key not in manifest:
            raise ArtifactError(where, f"manifest lacks the {key!r} section")
    q = manifest["quantization"]
    subsets = q.get("subsets", list(SUBSETS))
    if not isinstance(subsets, list) or not subsets or any(x not in SUBSETS for x in subsets):
        raise ArtifactError(where, f"quantization.subsets {subsets!r} is not a non-empty list of {', '.join(SUBSETS)}")
    if q.get("nbits") not in SUPPORTED_NBITS or not isinstance(q.get("num_codebooks"), int) \
            or not isinstance(q.get("group_size"), int):
        raise ArtifactError(where, f"unsupported quantization {q}: vqdm reads nbits={NBITS} with integer K and g")
    return manifest


def is_artifact(path: str | Path) -> bool:
    """An artifact folder (it has unet/manifest.json) or an artifact file (`vqdm export --single-file`)."""
    from vqdm.models.artifact_file import is_artifact_file  # that module builds on this one

    path = Path(path)
    return (path / MANIFEST_FILE).is_file() or is_artifact_file(path)


def manifest_sha256(path: str | Path) -> str:
    """The sha256 of unet/manifest.json: with every file's hash inside it, one value names the whole
    artifact (`vqdm inspect` prints it; compare it with the one you published). An artifact file
    carries that manifest byte for byte, so it has the same value as the folder it was exported from."""
    return sha256_file(Path(path) / MANIFEST_FILE)


def verify_files(path: str | Path, manifest: dict, hashes: bool = True) -> None:
    """Every file listed lies inside the artifact (or its declared components folder), exists and,
    with `hashes`, matches its sha256; the weights and config are listed; no file the manifest does
    not list is present (it would be loaded, or could be, without a check); no symbolic links.
    `hashes=False` skips only the sha256 (seconds per GB), never the layout checks."""
    path = Path(path)
    files = manifest["files"]
    if not isinstance(files, dict):
        raise ArtifactError(path / MANIFEST_FILE, "the 'files' section must map paths to sha256 digests")
    for required in (WEIGHTS_FILE, CONFIG_FILE):
        if required not in files:
            raise ArtifactError(path / MANIFEST_FILE, f"{required} is not listed in the manifest")
    shared = _shared_prefix(path, manifest)
    located = {rel: _listed_path(path, shared, rel) for rel in files}
    present = _tree_files(path)
    if shared is not None:  # the shared folder's components load too: each must be listed
        present += [f"{shared}/{rel}" for rel in _component_files(components_dir(path, manifest))]
    unlisted = sorted(rel for rel in present if rel not in files and rel != MANIFEST_FILE)
    if unlisted:
        more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        raise ArtifactError(path / unlisted[0], f"not listed in the manifest{more}: remove it, or re-export the "
                                                "artifact; vqdm loads only the files whose hashes it holds")
    for rel, digest in files.items():
        f = located[rel]
        if not f.is_file():
            raise ArtifactError(f, "missing (listed in the manifest)")
        if hashes and sha256_file(f) != digest:
            raise ArtifactError(f, "sha256 does not match the manifest: file truncated or edited")


def check_tensors(where: str | Path, found: dict[str, tuple[tuple[int, ...], str]],
                  expected: dict[str, torch.Tensor], what: str = "the U-Net config") -> None:
    """The tensors a file holds (name -> (shape, safetensors dtype)) are exactly those `expected`
    (a meta-device state dict built from the config), shape for shape; codes are uint8."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        raise ArtifactError(where, f"{len(missing)} tensor(s) missing, e.g. {missing[0]!r}")
    if extra:
        raise ArtifactError(where, f"{len(extra)} tensor(s) {what} does not have, e.g. {extra[0]!r}")
    for name, ref in expected.items():
        shape, dtype = found[name]
        if tuple(shape) != tuple(ref.shape):
            raise ArtifactError(where, f"tensor {name!r} has shape {tuple(shape)}, the config needs {tuple(ref.shape)}")
        if name.endswith(".codes") and dtype != "U8":
            raise ArtifactError(where, f"tensor {name!r} must be uint8 codes")


def vq_unet_skeleton(config: dict, manifest: dict, config_where: str | Path, manifest_where: str | Path):
    """The U-Net built from `config` on the meta device with VQ layers where `manifest` says, checked
    against the manifest's layer list; the weights are still to be loaded (`fill_vq_unet`)."""
    from diffusers import UNet2DConditionModel  # deferred: seconds to import; the CLI parser loads vqdm.models

    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
    except (TypeError, ValueError, KeyError) as e:
        raise ArtifactError(config_where, f"not a usable diffusers U-Net config ({e})") from None
    q = manifest["quantization"]
    # VQ layers: every selected layer of the quantized subsets; the others load as dense fp16 tensors
    selected = [n for n, _ in layers_in_subsets(select_layers(unet), quantized_subsets(manifest))]
    listed = [entry.get("name") for entry in manifest["layers"]]
    if set(selected) != set(listed):
        diff = sorted(set(selected) ^ set(listed))
        raise ArtifactError(manifest_where,
                            f"layer list does not match the U-Net config and quantized subsets "
                            f"({len(diff)} differ, e.g. {diff[0]!r})")
    replace_with_vq(unet, q["num_codebooks"], q["group_size"], names=selected)
    return unet


def fill_vq_unet(unet, tensors: dict[str, torch.Tensor], where: str | Path, device: str | torch.device):
    """`unet` (a `vq_unet_skeleton`) with `tensors` in place, frozen, in eval mode on `device`."""
    unet.load_state_dict(tensors, strict=True, assign=True)
    leftover = [n for n, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if leftover:
        raise ArtifactError(where, f"tensor(s) not provided by the file, e.g. {leftover[0]!r}")
    for p in unet.parameters():
        p.requires_grad_(False)
    return unet.to(device).eval()


def load_vq_unet(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 verify: bool = True):
    """(unet, manifest): the U-Net rebuilt from config with VQ layers in place and weights loaded
    (from an artifact folder, or an artifact file)."""
    path = Path(path)
    if path.is_file():
        from vqdm.models.artifact_file import load_vq_unet_file  # that module builds on this one

        return load_vq_unet_file(path, dtype, device, verify)
    manifest = read_manifest(path)
    verify_files(path, manifest, hashes=verify)
    cfg_file = path / CONFIG_FILE
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(cfg_file, f"not a usable diffusers U-Net config ({e})") from None
    unet = vq_unet_skeleton(config, manifest, cfg_file, path / MANIFEST_FILE)
    expected = unet.state_dict()
    weights = path / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt") as handle:
            check_tensors(weights, {k: (handle.get_slice(k).get_shape(), handle.get_slice(k).get_dtype())
                                    for k in handle.keys()}, expected)
            tensors = {}
            for name in expected:
                t = handle.get_tensor(name)
                tensors[name] = t if t.dtype == CODE_DTYPE else t.to(dtype)
    except SafetensorError as e:
        raise ArtifactError(weights, f"unreadable safetensors file ({e})") from None
    return fill_vq_unet(unet, tensors, weights, device), manifest


def load_artifact(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  verify: bool = True):
    """The whole StableDiffusionXLPipeline with its VQ U-Net; `pipe.vqdm_manifest` holds the manifest.
    `verify=False` skips the sha256 of every file (seconds per GB), never the layout checks."""
    from diffusers import StableDiffusionXLPipeline  # deferred: seconds to import; the CLI parser loads vqdm.models

    path = Path(path)
    if path.is_file():
        from vqdm.models.artifact_file import load_artifact_file  # that module builds on this one

        return load_artifact_file(path, dtype, device, verify)
    unet, manifest = load_vq_unet(path, dtype, device, verify)
    try:
        # safetensors only: a component folder carrying pickles (.bin, .pt) is refused, never unpickled.
        pipe = StableDiffusionXLPipeline.from_pretrained(components_dir(path, manifest), unet=unet, dtype=dtype,
                                                         local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ArtifactError(path, f"could not load the non-U-Net components: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    pipe.vqdm_manifest = manifest
    return pipe.to(device)


def inspect_artifact(path: str | Path) -> dict[str, Any]:
    """Summary for `vqdm inspect`: plan keys, per-layer errors, and integrity status."""
    path = Path(path)
    if path.is_file():
        from vqdm.models.artifact_file import inspect_artifact_file  # that module builds on this one

        return inspect_artifact_file(path)
    manifest = read_manifest(path)
    try:
        verify_files(path, manifest)
        integrity = "ok"
    except ArtifactError as e:
        integrity = f"FAILED: {e}"
    config = json.loads((path / CONFIG_FILE).read_text())
    return inspect_summary(path, manifest, config, integrity, manifest_sha256(path))


def inspect_summary(path: Path, manifest: dict, unet_config: dict, integrity: str, manifest_digest: str
                    ) -> dict[str, Any]:
    """What `vqdm inspect` shows of an artifact, folder or file, once its integrity is known."""
    q = manifest["quantization"]
    layers = manifest["layers"]
    plan = _plan_from_config(unet_config, q["num_codebooks"], q["group_size"], quantized_subsets(manifest)).to_dict()
    errors = [entry["rel_error"] for entry in layers if entry.get("rel_error") is not None]
    return {
        **plan,
        "path": str(path),
        "format_version": manifest["format_version"],
        "tool": manifest.get("tool"),
        "quantization": q,
        "base_model": manifest.get("base_model"),
        "calibration": manifest.get("calibration"),
        "distillation": manifest.get("distillation"),
        "weights_file_bytes": manifest.get("bytes", {}).get("weights_file"),
        "integrity": integrity,
        "manifest_sha256": manifest_digest,
        "median_rel_error": sorted(errors)[len(errors) // 2] if errors else None,
        "layer_errors": {entry["name"]: entry.get("rel_error") for entry in layers},
    }
