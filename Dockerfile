# syntax=docker/dockerfile:1
# Two images from one file (the serving image is the last stage, so the default):
#   serving: CUDA runtime + cuDNN, onnxruntime-gpu, FastAPI; no torch, no build tools.
#       docker build -t ssd-detector .
#   trainer: torch (CUDA wheels) for `ssd train` and `ssd export`.
#       docker build --target trainer -t ssd-detector-trainer .
# The locked onnxruntime-gpu (1.31) is built for CUDA 13 and cuDNN 9 (its error on a CUDA 12
# machine: "Require cuDNN 9.* and CUDA 13.*"), which this base provides; on a machine
# without a GPU the same image runs on the CPU provider (SSD_PROVIDERS=cpu).
ARG CUDA_BASE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

# ---- build the serving environment (uv, no torch) ------------------------------------------
FROM ${CUDA_BASE} AS serving-build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=ghcr.io/astral-sh/uv:0.9 /uv /usr/local/bin/uv
ENV UV_PYTHON=/usr/bin/python3.12 UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-default-groups --group serving --no-install-project
COPY cli.py ./
COPY model ./model
COPY export ./export
COPY service ./service
RUN uv sync --frozen --no-default-groups --group serving --no-editable

# ---- trainer image: torch + torchvision + onnx, for ssd data / train / evaluate / export ----
FROM python:3.11-slim-bookworm AS trainer
COPY --from=ghcr.io/astral-sh/uv:0.9 /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-install-project --no-group dev
COPY cli.py ./
COPY model ./model
COPY export ./export
COPY service ./service
COPY release ./release
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
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/* \
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
