"""A Commit whose client gives up while the engine loads: the rollout still serves one consistent version.

Real rollout processes over gRPC, on both engines. The load is held up by requests in flight (swap
policy drain waits for them), the Commit's deadline passes meanwhile, and only then do those requests
go: the commit is the rollout's, not its caller's, so it finishes, and GetStatus, health and Generate
all name the new version, whose answers are transformers' for its weights.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rollout_side.process import RolloutProcess
from trainer_side.publisher import Publisher
from trainer_side.train import greedy, new_model
from weightsync.channel import open_channel
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

import raw
from conftest import reference_model

PROMPT = "the cat sat"
# Requests in flight while the commit loads: n completions of this many tokens each (seconds of work on
# either engine), so the Commit's deadline passes while the load waits for them to drain.
HOLDING_N, HOLDING_TOKENS = 64, 400
COMMIT_DEADLINE = 2.0  # the client's; the load it cuts short takes as long as the requests above


def engines() -> list[object]:
    return ["torch", pytest.param("vllm", marks=pytest.mark.vllm)]


@pytest.mark.parametrize("engine", engines())
def test_a_commit_cancelled_mid_load_leaves_one_consistent_version(
    engine: str, model_dir: Path, tokenizer, trained_state: dict[str, torch.Tensor]
) -> None:  # type: ignore[no-untyped-def]
    if engine == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed")
    before = new_model(model_dir, seed=2).state_dict()  # version 1: any other weights
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    expected = greedy(reference_model(model_dir, trained_state), ids, 12)
    assert greedy(reference_model(model_dir, before), ids, 12) != expected, "a rollback would go unnoticed"

    with RolloutProcess(model_dir, engine=engine) as rollout, open_channel(rollout.address) as channel:
        stub, generate = pb_grpc.WeightSyncStub(channel), pb_grpc.GenerateStub(channel)
        with Publisher([rollout.address], progress=False) as publisher:
            assert publisher.push(before, version=1)[0].ok

        holding = generate.GenerateStream(
            pb.GenerateStreamRequest(
                request=pb.GenerateRequest(
                    prompt_token_ids=ids, max_tokens=HOLDING_TOKENS, ignore_eos=True, n=HOLDING_N
                )
            ),
            timeout=300,
        )
        assert next(holding).weight_version == 1  # under way: the load below waits for it
        tensors, manifest = raw.prepare(trained_state)
        update_id = raw.begin(stub, 2, manifest).update_id
        raw.push_chunks(channel, raw.encoded_chunks(update_id, tensors, manifest))
        with pytest.raises(grpc.RpcError) as info:
            stub.Commit(pb.CommitRequest(update_id=update_id), timeout=COMMIT_DEADLINE)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, "the load did not outlast the deadline"
        holding.cancel()  # the requests go; the load the Commit left goes on

        deadline = time.monotonic() + 120
        while (status := stub.GetStatus(pb.GetStatusRequest(), timeout=5)).state == pb.ROLLOUT_STATE_RECEIVING:
            assert time.monotonic() < deadline, "the commit never ended"
            time.sleep(0.05)
        assert (status.state, status.weight_version, status.fingerprint) == (
            pb.ROLLOUT_STATE_SERVING,
            2,
            manifest.fingerprint,
        ), "the commit went with its caller"
        answer = generate.Generate(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=12), timeout=60)
        assert (list(answer.token_ids), answer.weight_version) == (expected, 2)
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="weightsync.v1.Generate"), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
