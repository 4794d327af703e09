"""The lock in requirements/: complete, hashed, consistent across its files, covering every declared
dependency, and what `make test` actually installed. `make test-latest` deselects the last check
(`-m "not lock"`): there the newest releases stand in for the lock on purpose."""
from __future__ import annotations

import importlib.metadata
import re
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
REQ = REPO / "requirements"
LOCKS = ("runtime.txt", "test.txt", "gpu.txt")


def read_lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, [sha256, ...])} of a requirements file written by `make lock`."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in (REQ / name).read_text().splitlines():
        if line.startswith((" ", "\t")):
            digest = re.search(r"--hash=sha256:([0-9a-f]{64})", line)
            if digest and current:
                entries[current][1].append(digest.group(1))
            continue
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if m:
            current = canonicalize_name(m.group(1))
            entries[current] = (m.group(2), [])
        elif line.strip() and not line.startswith("#"):
            raise AssertionError(f"{name}: unexpected line {line!r} (only name==version and hashes)")
    return entries


def read_in(name: str) -> list[Requirement]:
    lines = [ln.split("#")[0].strip() for ln in (REQ / name).read_text().splitlines()]
    return [Requirement(ln) for ln in lines if ln]


def excluded() -> set[str]:
    return {canonicalize_name(r.name) for r in read_in("excludes.txt")}


@pytest.mark.parametrize("lock", LOCKS)
def test_every_locked_package_is_pinned_with_hashes(lock):
    entries = read_lock(lock)
    assert len(entries) > 20
    for name, (version, hashes) in entries.items():
        Version(version)  # an exact, valid version
        assert hashes, f"{lock}: {name}=={version} has no sha256"
    assert not excluded() & set(entries), f"{lock} holds an excluded package"


def test_locks_agree_and_torch_has_one_source():
    runtime, test, gpu = (read_lock(n) for n in LOCKS)
    for name, (version, _) in runtime.items():
        assert test.get(name, (None,))[0] == version, f"test.txt and runtime.txt differ on {name}"
    for name, (version, _) in gpu.items():
        assert runtime.get(name, (None,))[0] == version, f"gpu.txt and runtime.txt differ on {name}"
    (torch,) = read_in("torch.in")
    assert test["torch"][0] == str(torch.specifier).removeprefix("==")
    # The image installs its own torch flavour, the GPU machine has a CUDA build: neither lock has it.
    assert "torch" not in runtime and "torch" not in gpu and "triton" not in runtime and "triton" not in gpu
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ARG TORCH_VERSION={Version(test['torch'][0]).public}" in dockerfile


def test_every_declared_dependency_is_locked_within_its_range():
    """A dependency added to pyproject.toml or requirements/*.in without `make lock` fails here."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    declared += read_in("runtime.in") + read_in("test.in") + read_in("torch.in")
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    declared += [Requirement(r) for r in build]
    test = read_lock("test.txt")
    env = {"python_version": "3.11", "sys_platform": "linux", "platform_machine": "x86_64"}
    for req in declared:
        if req.marker and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in test, f"{req} is declared but not in requirements/test.txt: run `make lock`"
        assert req.specifier.contains(test[name][0], prereleases=True), f"locked {name}=={test[name][0]} breaks {req}"
    runtime = read_lock("runtime.txt")
    for req in [Requirement(r) for r in project["dependencies"]] + read_in("runtime.in"):
        name = canonicalize_name(req.name)
        if name not in ("torch", "triton") and (not req.marker or req.marker.evaluate(env)):
            assert name in runtime, f"runtime dependency {name} missing from requirements/runtime.txt"


def test_installers_use_the_lock():
    make = (REPO / "Makefile").read_text()
    assert re.search(r"\$\(PIP\) install -q --no-deps --require-hashes -r \$\(LOCK\)", make)
    assert re.search(r"^LOCK := requirements/test.txt$", make, re.M)
    gpu = (REPO / "benchmarks" / "run_gpu.sh").read_text()
    assert "--require-hashes --no-compile --no-cache-dir" in gpu and "-r requirements/gpu.txt" in gpu
    assert "make test" in (REPO / ".ci" / "run").read_text()


@pytest.mark.lock
def test_this_environment_is_the_lock():
    """What `make test` runs in holds exactly the locked versions (vqdm itself aside)."""
    locked = read_lock("test.txt")
    # The environment's own site-packages, not sys.path: importing setuptools (torch's inductor does, to
    # build C++) appends setuptools/_vendor, whose vendored dists are no installed packages.
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=site)}
    installed.pop("vqdm", None)
    assert {n: v for n, v in installed.items() if locked.get(n, (None,))[0] != v} == {}
