"""The one safetensors header reader (vqdm.models.safetensors_header), checked against the
safetensors library itself: what it writes reads back, and what breaks the format is refused by
both, with the file named through each caller's error type."""
import json

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vqdm.errors import ArtifactError, ModelFolderError
from vqdm.models import artifact_file, single_file
from vqdm.models.safetensors_header import SafetensorsFormatError, encode_header, read_safetensors_header


@pytest.fixture
def plain(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float16).reshape(2, 3), "b": torch.ones(4), "e": torch.zeros(0)},
              str(path), metadata={"k": "v"})
    return path


def _rewrite(path, edit, tail=b""):
    """`path` with its header JSON passed through `edit` (the data kept), plus `tail` after the data."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    raw = edit(data[8:8 + n])
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:] + tail)
    return path


def _json_edit(change):
    def edit(raw):
        header = json.loads(raw)
        change(header)
        return json.dumps(header).encode()
    return edit


def test_reads_what_safetensors_writes_and_writes_what_it_reads(plain, tmp_path):
    header = read_safetensors_header(plain)
    assert header.metadata == {"k": "v"} and header.size == plain.stat().st_size
    assert {k: (e.dtype, e.shape) for k, e in header.tensors.items()} == \
        {"a": ("F16", (2, 3)), "b": ("F32", (4,)), "e": ("F32", (0,))}
    with open(plain, "rb") as f:
        f.seek(header.tensors["a"].start)
        assert f.read(12) == torch.arange(6, dtype=torch.float16).numpy().tobytes()
    out = tmp_path / "written.safetensors"
    tensors = {"x": torch.randn(3, 2), "i": torch.arange(5, dtype=torch.int64)}
    raw = encode_header([(k, {torch.float32: "F32", torch.int64: "I64"}[t.dtype], tuple(t.shape))
                         for k, t in tensors.items()], {"m": "1"})
    out.write_bytes(raw + b"".join(t.numpy().tobytes() for t in tensors.values()))
    assert len(raw) % 8 == 0  # the data starts aligned
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"m": "1"} and all(torch.equal(f.get_tensor(k), t) for k, t in tensors.items())
    assert list(read_safetensors_header(out).tensors) == ["x", "i"]


BROKEN = {
    "trailing bytes": (lambda raw: raw, b"\0" * 8, r"8 bytes after the last tensor, which the safetensors format"),
    "a hole": (_json_edit(lambda h: h["b"].update(data_offsets=[h["b"]["data_offsets"][0] + 4,
                                                              h["b"]["data_offsets"][1] + 4])), b"\0" * 4,
               r"tensor 'b' starts at byte [\d,]+, the tensor before it ends at"),
    "non-string metadata": (_json_edit(lambda h: h["__metadata__"].update(k=1)), b"",
                            r"__metadata__ must map names to strings"),
    "no opening brace": (lambda raw: b" " + raw[:-1], b"", r"its header does not start with '\{'"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_what_safetensors_refuses_is_refused_by_each_caller(plain, kind):
    edit, tail, message = BROKEN[kind]
    _rewrite(plain, edit, tail)
    with pytest.raises(SafetensorError):  # the library agrees that the file is broken
        with safe_open(str(plain), framework="pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(SafetensorsFormatError, match=message):
        read_safetensors_header(plain)
    with pytest.raises(ArtifactError, match=r"plain\.safetensors: .*" + message):
        artifact_file.read_safetensors_header(plain)
    with pytest.raises(ModelFolderError, match=r"plain\.safetensors: .*" + message):
        single_file.read_header(plain)


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, r"tensor 'a': dtype F32 shape \[2\] does not fit its 4 bytes"),
    ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 4]}, r"tensor 'a' has dtype 'Q4'"),
    ({"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}, r"tensor 'a' has a malformed entry"),
    ({"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}, r"tensor 'a' has a malformed entry"),
])
def test_malformed_entries_are_named(tmp_path, entry, message):
    path = tmp_path / "bad.safetensors"
    raw = json.dumps({"a": entry}).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * entry["data_offsets"][-1])
    with pytest.raises(SafetensorsFormatError, match=r"bad\.safetensors: corrupt safetensors header: " + message):
        read_safetensors_header(path)


def test_duplicate_names_are_refused(plain):
    # the format disallows them; json.loads alone would keep the last silently
    _rewrite(plain, lambda raw: raw.replace(b'"b":', b'"a":', 1))
    with pytest.raises(SafetensorsFormatError, match="corrupt safetensors header \\(name 'a' appears twice"):
        read_safetensors_header(plain)


def test_writers_refuse_a_name_the_reader_takes_for_a_pickle(tmp_path):
    from vqdm.models.digits import DIGITS_ARTIFACT_DIR

    with pytest.raises(ArtifactError, match=r"model\.ckpt: a \.ckpt name, which vqdm takes for a pickle"):
        artifact_file.export_single_file(DIGITS_ARTIFACT_DIR, tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match=r"model\.pt: a \.pt name, which vqdm takes for a pickle"):
        single_file.write_single_file(None, tmp_path / "model.pt")  # refused before the pipeline is looked at
    assert not list(tmp_path.iterdir())
