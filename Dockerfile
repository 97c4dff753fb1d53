# Two images from one file (the serving image is the last stage, so the default):
#   serving: CUDA runtime + cuDNN, onnxruntime-gpu, FastAPI; no torch, no build tools.
#       docker build -t ssd-detector .
#   trainer: torch (CUDA wheels) for `ssd train` and `ssd export`.
#       docker build --target trainer -t ssd-detector-trainer .
# The locked onnxruntime-gpu (1.31) is built for CUDA 13 and cuDNN 9 (its error on a CUDA 12
# machine: "Require cuDNN 9.* and CUDA 13.*"), which this base provides; on a machine
# without a GPU the same image runs on the CPU provider (SSD_PROVIDERS=cpu).
#
# Every base is a build argument, so that the images build where no registry is reachable:
# `make image-test` (deploy/image-test.sh) builds them on a Debian bookworm made from Debian's
# packages, with --build-arg CUDA_BASE=... PYTHON_BASE=... PYTHON=python3.11. No `# syntax=` line
# either: BuildKit would pull that frontend from Docker Hub, and the built-in one suffices.
ARG CUDA_BASE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04
ARG PYTHON_BASE=python:3.11-slim-bookworm
# The interpreter the serving stages install from CUDA_BASE's apt (ubuntu 24.04 has 3.12).
ARG PYTHON=python3.12
# uv from PyPI rather than ghcr.io/astral-sh/uv: the same binary, from an index every build
# reaches. Pinned: the uv that wrote uv.lock.
ARG UV_VERSION=0.13.9

# ---- build the serving environment (uv, no torch) ------------------------------------------
FROM ${CUDA_BASE} AS serving-build
ARG PYTHON
ARG UV_VERSION
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ${PYTHON} ${PYTHON}-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && ${PYTHON} -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir uv==${UV_VERSION} \
    && ln -s /opt/uv/bin/uv /usr/local/bin/uv
# No cache: the classic builder has no cache mounts, and a cache in the layer doubles it.
ENV UV_PYTHON=/usr/bin/${PYTHON} UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_NO_CACHE=1
WORKDIR /app
# The dependencies first, from the lock alone: an edit anywhere else (README.md, which the
# project's build reads, included) then reuses this layer rather than downloading them again.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-default-groups --group serving --no-install-project
# What the wheel ships (pyproject's only-include): `ssd` builds every subcommand's parser at start,
# so a package left out fails `ssd serve` itself (tests/test_deploy.py checks the two agree).
COPY README.md cli.py ./
COPY model ./model
COPY export ./export
COPY service ./service
COPY release ./release
COPY bench ./bench
COPY attacks ./attacks
RUN uv sync --frozen --no-default-groups --group serving --no-editable

# ---- trainer image: torch + torchvision + onnx, for ssd data / train / evaluate / export ----
FROM ${PYTHON_BASE} AS trainer
ARG UV_VERSION
RUN python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir uv==${UV_VERSION} \
    && ln -s /opt/uv/bin/uv /usr/local/bin/uv
# No cache: a cache in the layer was 6.4 GB beside the 6.0 GB environment.
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never UV_NO_CACHE=1
WORKDIR /app
# As above: a README edit re-downloaded the 6 GB of torch and its CUDA wheels.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-install-project --no-group dev
COPY README.md cli.py ./
COPY model ./model
COPY export ./export
COPY service ./service
COPY release ./release
COPY bench ./bench
COPY attacks ./attacks
COPY deploy/retrain.sh ./deploy/retrain.sh
RUN uv sync --frozen --no-group dev --no-editable \
    && useradd --create-home --uid 10001 trainer \
    && mkdir -p /models /runs /data && chown trainer /models /runs /data
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1
USER 10001
ENTRYPOINT ["ssd"]
CMD ["--help"]

# ---- serving image --------------------------------------------------------------------------
FROM ${CUDA_BASE} AS serving
ARG PYTHON
# apt's package caches too (77 MB on a Debian base; Ubuntu's image config keeps none).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ${PYTHON} \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && useradd --create-home --uid 10001 detector \
    && mkdir -p /models && chown detector /models
COPY --from=serving-build /app/.venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SSD_MODEL_PATH=/models/model.onnx \
    SSD_PROVIDERS=cuda,cpu \
    SSD_GRPC_PORT=8001
USER 10001
WORKDIR /home/detector
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
ENTRYPOINT ["ssd", "serve", "--host", "0.0.0.0", "--port", "8000"]
