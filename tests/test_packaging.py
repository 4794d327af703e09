"""Installing vqdm must not add top-level `kernels`, `models` or `server` modules (SPEC §1)."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_subpackages_import_only_under_vqdm(tmp_path):
    """The vqdm distribution provides one top-level name, and `kernels`, `models`, `server` and
    `quantizer` never resolve into this checkout's sources: looked up from outside the repo and from
    its root, wherever the venv lives (the Makefile puts it inside the repo)."""
    code = (
        "import importlib.metadata, importlib.util, json, vqdm.kernels, vqdm.models, vqdm.quantizer, vqdm.server\n"
        "tops = importlib.metadata.packages_distributions()\n"
        "print(json.dumps({'origins': {m: (lambda s: s.origin if s else None)(importlib.util.find_spec(m))"
        " for m in ['kernels', 'models', 'server', 'quantizer', 'vqdm.kernels']},"
        " 'from_vqdm': sorted(t for t, dists in tops.items() if 'vqdm' in dists)}))"
    )
    for cwd in (tmp_path, REPO):
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
        found = json.loads(out.stdout)
        origins = found["origins"]
        assert origins["vqdm.kernels"] == str(REPO / "vqdm" / "kernels" / "__init__.py")
        assert found["from_vqdm"] == ["vqdm"], found["from_vqdm"]
        for top in ("kernels", "models", "server", "quantizer"):
            origin = origins[top]
            if origin is None:
                continue
            path = Path(origin).resolve()
            assert not path.is_relative_to(REPO / "vqdm") and not path.is_relative_to(REPO / top), (cwd, top, origin)


def test_built_wheel_holds_only_the_vqdm_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("vqdm-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
        entry_points = zf.read(next(n for n in zf.namelist() if n.endswith("entry_points.txt"))).decode()
        names = set(zf.namelist())
    assert {t for t in tops if not t.endswith(".dist-info")} == {"vqdm"}
    for sub in ("kernels", "models", "quantizer", "server", "quantizer/layer", "quantizer/quantize",
                "quantizer/distill", "quantizer/evaluate"):
        assert f"vqdm/{sub}/__init__.py" in names
    assert "vqdm/quantizer/prompts.txt" in names or not (REPO / "vqdm" / "quantizer" / "prompts.txt").exists()
    assert "vqdm = vqdm.cli:main" in entry_points
