# syntax=docker/dockerfile:1
# vqdm server image. CPU by default; a GPU image with one build arg:
#   docker build -t vqdm:cpu .
#   docker build --build-arg CUDA=cu128 -t vqdm:cu128 .
# CUDA names a PyTorch wheel flavour (cu126, cu128, ...). Those wheels carry the CUDA runtime,
# cuBLAS and cuDNN as pip packages, so the base stays python-slim and the host needs only the
# NVIDIA driver and container toolkit (`docker run --gpus all`, or nvidia.com/gpu in k8s).
# Artifacts are mounted read-only at /models; with none, the server loads the prebuilt artifact of its
# embedded tiny default (package data). Configuration: VQDM_* environment variables (docs/deploy.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG CUDA=""
# Must equal requirements/torch.in (tests/test_lock.py checks it).
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/vqdm
ENV PATH=/opt/vqdm/bin:$PATH
# torch first, from PyTorch's own index: PyPI's default torch wheel is the multi-GB CUDA build,
# which a CPU image must not carry. torch alone is pinned by version, not hash: each CUDA flavour
# is a different file. A CUDA build brings the Triton and nvidia-* wheels it pins exactly.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" \
        --index-url "https://download.pytorch.org/whl/${CUDA:-cpu}"
# Everything else from the lock: pinned versions, sha256-checked, nothing resolved or added
# (--no-deps; the lock is complete). It also replaces what torch pulled with the locked versions.
# The lock leaves Triton out, so a CPU image carries none (~1 GB it never runs).
COPY requirements/runtime.txt /src/requirements/runtime.txt
RUN pip install --no-cache-dir --no-deps --require-hashes -r /src/requirements/runtime.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vqdm/ vqdm/
# A regular (non-editable) install: the runtime stage copies /opt/vqdm and nothing from /src.
# --no-build-isolation: the build backend is the locked setuptools, not a fresh download.
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && vqdm --version

FROM ${PYTHON_IMAGE} AS runtime
ARG CUDA=""
# Triton JIT-compiles a small C launcher per kernel at run time, so GPU images need a C compiler
# (Python's headers are already in the python image). CPU images stay without one.
# hadolint ignore=DL3008
RUN if [ -n "${CUDA}" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 vqdm \
    && useradd --system --uid 10001 --gid vqdm --home-dir /home/vqdm --create-home vqdm \
    && mkdir -p /models
COPY --from=build /opt/vqdm /opt/vqdm
# Every cache goes under /tmp so the container runs with a read-only root filesystem
# (compose: read_only + tmpfs; k8s: readOnlyRootFilesystem + an emptyDir at /tmp).
ENV PATH=/opt/vqdm/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/hf \
    XDG_CACHE_HOME=/tmp/cache \
    TRITON_CACHE_DIR=/tmp/triton \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VQDM_HOST=0.0.0.0 \
    VQDM_PORT=8000
WORKDIR /home/vqdm
# Numeric user so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 8000
# /healthz is liveness only (the process answers); /readyz says the models are loaded and warm.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VQDM_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["vqdm"]
CMD ["serve"]
