"""Installing vqdm must not add top-level `kernels`, `models` or `server` modules (SPEC §1)."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_subpackages_import_only_under_vqdm(tmp_path):
    code = (
        "import importlib.util, json, vqdm.kernels, vqdm.models, vqdm.quantizer, vqdm.server\n"
        "print(json.dumps({m: (lambda s: s.origin if s else None)(importlib.util.find_spec(m))"
        " for m in ['kernels', 'models', 'server', 'quantizer', 'vqdm.kernels']}))"
    )
    # run outside the repo so the checkout itself is not on sys.path
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    found = json.loads(out.stdout)
    assert found["vqdm.kernels"] == str(REPO / "vqdm" / "kernels" / "__init__.py")
    for top in ("kernels", "models", "server", "quantizer"):
        assert found[top] is None or not str(found[top]).startswith(str(REPO)), (top, found[top])


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
