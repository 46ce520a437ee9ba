# syntax=docker/dockerfile:1
# The weightsync trainer side: `push`, `status` and the demo `train`. Build from the repository root:
#   docker build -f deploy/docker/trainer.Dockerfile -t weightsync/trainer:0.1.0 .
# CPU torch by default (the trainer only reads, casts and sends weights); for CUDA training set
# --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 (or base your own trainer image on it).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG GRPCIO_TOOLS_VERSION=1.85.1
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/weightsync \
    HF_HUB_OFFLINE=1

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/weightsync --shell /usr/sbin/nologin weightsync
RUN python3 -m pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /opt/weightsync/src
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY weightsync/ weightsync/
COPY trainer_side/ trainer_side/
COPY rollout_side/ rollout_side/
COPY scripts/build_tiny_model.py scripts/
# Stubs as `make proto` makes them, the package, and models/tiny for the demo trainer.
RUN python3 -m pip install "grpcio-tools==${GRPCIO_TOOLS_VERSION}" \
    && python3 -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
        proto/weightsync/v1/weightsync.proto \
    && touch weightsync/v1/__init__.py \
    && python3 -m pip install . \
    && python3 -m pip uninstall -y grpcio-tools \
    && python3 scripts/build_tiny_model.py /opt/weightsync/models/tiny \
    && cd / && rm -rf /opt/weightsync/src

COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/weightsync-healthcheck

WORKDIR /opt/weightsync
USER 10001:10001
# No EXPOSE: the trainer only dials out, to the rollouts' port 50051.
ENTRYPOINT ["python3", "-m", "trainer_side"]
CMD ["--help"]
