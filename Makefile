# Two commands a newcomer needs: `make test` and `make serve`. Both set everything up first, from
# the lock in requirements/ (every package at a pinned version and sha256).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.vqdm-installed
LOCK := requirements/test.txt
# The lock targets the Python of this machine, CI and the Docker image (python:3.11), and the
# Python of the lent GPU machines (3.12) for `make gpu-wheels`.
LOCK_PYTHON ?= 3.11
GPU_PYTHON ?= 3.12
# Where pip finds the CPU build of torch (pip.conf sets the same on this kind of machine).
TORCH_FIND_LINKS ?= /opt/wheels
UV_VERSION := 0.13.9
UV_COMPILE := .venv-lock/bin/uv pip compile --upgrade --generate-hashes --custom-compile-command "make lock"

.PHONY: test serve install lock test-latest gpu-wheels clean

# --clear: the venv holds exactly the lock, nothing left from an earlier one. --no-deps: the lock is
# complete, so pip resolves nothing and adds nothing; --require-hashes: every file is the locked one.
$(STAMP): $(LOCK) pyproject.toml Makefile
	$(PYTHON) -m venv --clear $(VENV)
	$(PIP) install -q --no-deps --require-hashes -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# Two workers on this 2-core kind of machine: much of the suite waits (servers starting, a soak's
# clock, Prometheus scrapes), and the other worker runs meanwhile. --dist loadfile: a test file's
# module fixtures are built once, on one worker.
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_PARALLEL)

serve: $(STAMP)
	$(VENV)/bin/vqdm serve --host 127.0.0.1 --port 8000

# Regenerates the three locks from pyproject.toml and requirements/*.in at the newest releases that
# fit them. Then `make test` (which reinstalls from the new lock) and commit requirements/.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q uv==$(UV_VERSION)
	$(UV_COMPILE) --python-version $(LOCK_PYTHON) --find-links $(TORCH_FIND_LINKS) \
	    --excludes requirements/excludes.txt --constraints requirements/torch.in --no-emit-package torch \
	    --no-emit-package triton \
	    pyproject.toml requirements/runtime.in -o requirements/runtime.txt
	$(UV_COMPILE) --python-version $(LOCK_PYTHON) --find-links $(TORCH_FIND_LINKS) \
	    --excludes requirements/excludes.txt --constraints requirements/runtime.txt \
	    --extra test pyproject.toml requirements/runtime.in requirements/test.in requirements/torch.in \
	    -o requirements/test.txt
	$(UV_COMPILE) --python-version $(GPU_PYTHON) --python-platform x86_64-manylinux_2_28 \
	    --excludes requirements/excludes.txt --excludes requirements/gpu-excludes.txt \
	    --constraints requirements/runtime.txt --no-emit-package setuptools --no-emit-package wheel \
	    pyproject.toml requirements/runtime.in -o requirements/gpu.txt

# The suite against the newest releases of everything but torch (kept at the locked CPU build: the
# newest torch on PyPI is a multi-GB CUDA build), so an upstream break shows here before a lock bump.
# The packages beside pyproject's come from the lock's inputs (runtime.in, test.in), --no-deps for
# the same reason as there (excludes.txt: declared dependencies vqdm never imports).
test-latest:
	$(PYTHON) -m venv --clear .venv-latest
	.venv-latest/bin/pip install -q --upgrade pip
	.venv-latest/bin/pip install -q -r requirements/torch.in
	.venv-latest/bin/pip install -q --upgrade --no-deps -r requirements/runtime.in -r requirements/test.in
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager -c requirements/torch.in -e ".[test]"
	.venv-latest/bin/pip list --format=freeze > .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -q $(PYTEST_PARALLEL) -m "not lock"

# Wheels for a GPU machine without internet (Python $(GPU_PYTHON), x86-64), hash-checked against
# requirements/gpu.txt: diffusers and everything the runtime pulls in, beside the machine's own
# CUDA torch. benchmarks/run_gpu.sh installs them from .whl/ (carry it: `carry: [".whl"]`).
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --require-hashes --only-binary=:all: \
	    --python-version $(GPU_PYTHON) --implementation cp --platform manylinux_2_28_x86_64 \
	    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl -r requirements/gpu.txt
	du -sh .whl

clean:
	rm -rf $(VENV) .venv-latest .venv-lock build *.egg-info .whl
