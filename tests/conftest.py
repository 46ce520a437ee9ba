"""Shared fixtures: the tiny model, a briefly trained checkpoint, and real rollout servers on loopback."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import save_file
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from rollout_side.engines.torch_engine import TorchEngine  # noqa: E402
from rollout_side.server import RolloutServer, create_server  # noqa: E402
from rollout_side.update.receiver import Receiver  # noqa: E402
from trainer_side.train import new_model, train_iterations  # noqa: E402
from weightsync.v1 import weightsync_pb2 as pb  # noqa: E402
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc  # noqa: E402

T = TypeVar("T")

# TRL's import sets VLLM_LOGGING_LEVEL=ERROR unless set, and every vLLM rollout a test starts inherits it:
# none of vLLM's boot lines would be logged (boot tests wait for them). INFO is vLLM's own default.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/tiny as `make model` builds it (built here if a test run skipped make)."""
    built = ROOT / "models" / "tiny"
    if (built / "config.json").is_file():
        return built
    import build_tiny_model

    out = tmp_path_factory.mktemp("model") / "tiny"
    build_tiny_model.build(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def trained_state(model_dir: Path, tokenizer) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """A deterministically, briefly trained float32 state dict (clear argmax margins), ties kept."""
    model = new_model(model_dir)
    train_iterations(model, tokenizer, 60)
    return model.state_dict()


@pytest.fixture(scope="session")
def trained_checkpoint(trained_state: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """trained_state saved as bf16 safetensors, tied lm_head dropped (as Hugging Face saves it)."""
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in trained_state.items() if k != "lm_head.weight"}
    save_file(state, path)
    return path


class LoopThread:
    """An asyncio loop on its own thread: the rollout's grpc.aio server lives there, tests stay sync."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Rollout:
    """A real rollout server on a loopback port, with channels for tests."""

    def __init__(self, loop: LoopThread, server: RolloutServer) -> None:
        self.loop = loop
        self.server = server
        self.receiver = server.receiver
        self.address = f"127.0.0.1:{server.port}"
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.max_send_message_length", 256 << 20)])
        self.weight_sync = pb_grpc.WeightSyncStub(self.channel)
        self.generate = pb_grpc.GenerateStub(self.channel)


def start_rollout(
    loop: LoopThread, model_dir: Path, weights: Path | None = None, port: int = 0, **receiver_args: Any
) -> Rollout:
    async def boot() -> RolloutServer:
        receiver = Receiver(TorchEngine(model_dir), **receiver_args)
        await receiver.start(weights, 1)
        return await create_server(receiver, address=f"127.0.0.1:{port}", model=str(model_dir))

    return Rollout(loop, loop.run(boot()))


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture
def rollout(loop_thread: LoopThread, model_dir: Path) -> Iterator[Rollout]:
    """A fresh torch-engine rollout with dummy weights (boots in about a second), on the defaults users get:
    the 60 s idle timeout included, so a test that passes only by waiting for the reaper fails instead."""
    r = start_rollout(loop_thread, model_dir)
    yield r
    r.channel.close()
    loop_thread.run(r.server.stop(grace=0))


def health_of(rollout: Rollout, service: str = "weightsync.v1.Generate") -> int:
    """What grpc.health.v1 says of `service` on `rollout`."""
    stub = health_pb2_grpc.HealthStub(rollout.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def assert_gated(rollout: Rollout) -> None:
    """No complete version: health NOT_SERVING and Generate refused as UNAVAILABLE."""
    assert health_of(rollout) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as info:
        rollout.generate.Generate(pb.GenerateRequest(prompt="the cat"), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()


def reference_model(model_dir: Path, state: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    """Hugging Face transformers on exactly the weights that went on the wire (bf16)."""
    model = new_model(model_dir)
    model.load_state_dict(state)
    return model.to(torch.bfloat16).eval()
