"""The repository root can shadow no import, whatever the entry point.

`python -m`, `python -c` and torch-multiprocessing workers put the working directory at the front of
`sys.path`. A root folder with an `__init__.py` named like a dependency's package (`kernels/` once,
against Hugging Face's `kernels`, which transformers imports) then wins over the installed one and
breaks every diffusers pipeline load. These tests run each entry point with the root as the working
directory, the way a newcomer does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINE_IMPORT = ("import transformers.integrations.hub_kernels, diffusers; "
                   "from diffusers import StableDiffusionXLPipeline")


def run_from_root(argv: list[str], extra_env: dict[str, str] | None = None, timeout: float = 300):
    # A newcomer's shell: no PYTHONSAFEPATH, no PYTHONPATH that would hide what the cwd does.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", **(extra_env or {}))
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_root_holds_no_importable_package_but_vqdm():
    importable = []
    for entry in REPO.iterdir():
        if entry.name.startswith("."):
            continue  # hidden folders (.venv, .git) are not valid module names
        if entry.is_dir() and (entry / "__init__.py").exists():
            importable.append(entry.name)
        elif entry.is_file() and entry.suffix in (".py", ".pyc", ".so", ".pyd"):
            importable.append(entry.name)
    assert importable == ["vqdm"], f"importable from the repo root: {importable}; move code under vqdm/"


def test_no_installed_top_level_name_resolves_into_the_checkout():
    """Every top-level module that an installed distribution provides, looked up with the root as
    the working directory, is found where the distribution put it (the venv may live in the repo)."""
    code = textwrap.dedent("""
        import importlib.metadata, importlib.util, json, sys, sysconfig
        from pathlib import Path
        site = [Path(p).resolve() for p in {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}]
        root = Path.cwd().resolve()
        bad = {}
        for name in importlib.metadata.packages_distributions():
            if not name.isidentifier() or name == "vqdm":
                continue
            spec = importlib.util.find_spec(name)
            for loc in ([spec.origin] if spec and spec.origin else []) + list(spec.submodule_search_locations or [] if spec else []):
                p = Path(loc).resolve()
                if p.is_relative_to(root) and not any(p.is_relative_to(s) for s in site):
                    bad[name] = str(p)
        print(json.dumps(bad))
    """)
    proc = run_from_root([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}


def test_python_c_imports_the_hub_kernels_and_the_sdxl_pipeline():
    proc = run_from_root([sys.executable, "-c", PIPELINE_IMPORT + "; print('ok')"])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_python_m_vqdm_cli_help():
    proc = run_from_root([sys.executable, "-m", "vqdm.cli", "--help"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "quantize" in proc.stdout and "serve" in proc.stdout


def test_spawned_torch_worker_imports_diffusers(tmp_path):
    (tmp_path / "spawn_probe.py").write_text(textwrap.dedent(f"""
        import json, os, sys
        from pathlib import Path

        def work(rank, out):
            {PIPELINE_IMPORT}
            import kernels
            on_path = any(os.path.abspath(p or ".") == os.getcwd() for p in sys.path)
            Path(out, "probe.json").write_text(json.dumps({{"kernels": kernels.__file__, "cwd_on_path": on_path}}))
    """))
    code = (f"import torch.multiprocessing as mp, spawn_probe; "
            f"mp.spawn(spawn_probe.work, args=({str(tmp_path)!r},), nprocs=1, join=True)")
    # PYTHONPATH reaches the probe module; the child inherits the parent's sys.path, cwd entry first.
    proc = run_from_root([sys.executable, "-c", code], extra_env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["cwd_on_path"], "the worker must see the root on sys.path, or this test proves nothing"
    assert not Path(probe["kernels"]).resolve().is_relative_to(REPO / "vqdm")


def test_saved_pipeline_loads_through_diffusers(tmp_path):
    from vqdm.cli import main
    from vqdm.models.loading import load_pipeline

    assert main(["make-model", "tiny-sdxl", "--out", str(tmp_path / "m"), "--seed", "0"]) == 0
    pipe = load_pipeline(tmp_path / "m")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"


def test_python_m_pytest_from_the_root_loads_a_pipeline():
    target = f"{Path(__file__).relative_to(REPO)}::test_saved_pipeline_loads_through_diffusers"
    proc = run_from_root([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", target])
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
