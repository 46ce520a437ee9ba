"""Delta sync over real gRPC: bit-identical results, refusals that end in a full version, restarts and catch-up.

Nothing on the weight path is mocked. Faults come from a real hop that rewrites chunks (a tampering
proxy), a second trainer, a hand-built patch against the wrong base, and killed rollout processes.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file

from rollout_side.process import RolloutProcess
from trainer_side.publisher import Publisher
from trainer_side.train import greedy, new_model
from weightsync import delta, wire
from weightsync.errors import Reason, reason_of
from weightsync.manifest import manifest_of_state, tensor_bytes
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

import raw
from conftest import ROOT, LoopThread, Rollout

PROMPTS = ["the cat sat", "monday tuesday", "one two three"]
MAX_TOKENS = 12


def bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trainer's bf16 weights, tied lm_head left out (as Hugging Face saves them)."""
    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items() if k != "lm_head.weight"}


def bump(state: dict[str, torch.Tensor], fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """A copy with exactly `fraction` of each tensor's elements moved by one bf16 ulp (1.0: every element)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        tensor = tensor.clone()
        bits = tensor.view(torch.int16).view(-1)
        picked = torch.randperm(bits.numel(), generator=gen)[: round(bits.numel() * fraction)]
        bits[picked] += 1
        out[name] = tensor
    return out


def changed_fraction(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    changed = sum(int((a[k].view(torch.int16) != b[k].view(torch.int16)).sum()) for k in a)
    return changed / sum(t.numel() for t in a.values())


def assert_serves(rollout: Rollout, state: dict[str, torch.Tensor], version: int) -> None:
    """Fingerprint, every tensor bit for bit, and the engine's own parameters (tied lm_head included)."""
    status = rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
    assert (status.weight_version, status.fingerprint) == (version, manifest_of_state(state).fingerprint)
    live = rollout.receiver.engine.model.state_dict()  # type: ignore[attr-defined]
    for name, tensor in {**state, "lm_head.weight": state["model.embed_tokens.weight"]}.items():
        assert torch.equal(live[name].view(torch.int16), tensor.view(torch.int16)), name


def reference_answers(
    model_dir: Path, state: dict[str, torch.Tensor], tokenizer, prompts=PROMPTS
) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    """Hugging Face transformers' greedy answers on exactly these bf16 weights."""
    model = new_model(model_dir)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model = model.to(torch.bfloat16).eval()
    return {p: greedy(model, tokenizer(p, add_special_tokens=False)["input_ids"], MAX_TOKENS) for p in prompts}


def answers(address_or_stub, tokenizer) -> dict[str, tuple[list[int], int]]:  # type: ignore[no-untyped-def]
    stub = address_or_stub
    if isinstance(stub, str):
        stub = pb_grpc.GenerateStub(grpc.insecure_channel(stub))
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply = stub.Generate(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=MAX_TOKENS), timeout=60)
        out[prompt] = (list(reply.token_ids), reply.weight_version)
    return out


class Watcher:
    """Calls Generate in a loop on another thread: every answer is recorded with its version."""

    def __init__(self, stub: pb_grpc.GenerateStub, tokenizer) -> None:  # type: ignore[no-untyped-def]
        self.ids = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
        self.stub = stub
        self.seen: list[tuple[int, list[int]]] = []
        self.errors: list[grpc.RpcError] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        request = pb.GenerateRequest(prompt_token_ids=self.ids, max_tokens=MAX_TOKENS)
        while not self._stop.is_set():
            try:
                reply = self.stub.Generate(request, timeout=30)
                self.seen.append((reply.weight_version, list(reply.token_ids)))
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:  # expected only before a first commit
                    self.errors.append(error)
                time.sleep(0.05)

    def stop(self) -> list[tuple[int, list[int]]]:
        self._stop.set()
        self._thread.join(60)
        assert not self.errors, self.errors
        return self.seen


def assert_only_right_answers(seen: list[tuple[int, list[int]]], expected: dict[int, list[int]]) -> None:
    """Nothing wrong was ever served: each answer is what its version's weights say."""
    assert seen, "the watcher got no answers"
    for version, tokens in seen:
        assert version in expected and tokens == expected[version], (version, tokens)


def test_delta_push_is_bit_identical(rollout: Rollout, model_dir: Path, tokenizer, trained_state) -> None:  # type: ignore[no-untyped-def]
    v1 = bf16(trained_state)
    v2 = bump(v1, 0.01, seed=2)
    v3 = bump(v2, 0.01, seed=3)
    v4 = bump(v3, 1.0, seed=4)  # dense: every element changed
    v5 = bump(v4, 0.002, seed=5)
    v6 = bump(v5, 0.002, seed=6)
    assert changed_fraction(v1, v2) == pytest.approx(0.01, rel=0.01)
    total = sum(t.numel() * 2 for t in v1.values())
    watcher = Watcher(rollout.generate, tokenizer)
    with Publisher([rollout.address], progress=False, delta=True) as publisher:
        [first] = publisher.push(v1, 1)
        assert first.ok and not first.delta and first.bytes_sent == total
        assert_serves(rollout, v1, 1)
        for version, state in [(2, v2), (3, v3)]:
            [result] = publisher.push(state, version)
            assert result.ok and result.delta, result.error
            assert result.fingerprint == manifest_of_state(state).fingerprint
            assert result.bytes_sent < total / 20, (result.bytes_sent, total)  # 1% changed: ~1.5% of the bytes
            assert_serves(rollout, state, version)
        [dense] = publisher.push(v4, 4)
        assert dense.ok and not dense.delta and dense.bytes_sent == total  # fell back to the full version
        assert_serves(rollout, v4, 4)
        # After a dense update the publisher kept no base (it would have cost a full copy): one full push,
        # then deltas again on top of it.
        [result] = publisher.push(v5, 5)
        assert result.ok and not result.delta
        [result] = publisher.push(v6, 6)
        assert result.ok and result.delta and result.bytes_sent < total / 50
        assert_serves(rollout, v6, 6)
    expected = reference_answers(model_dir, v6, tokenizer)
    assert answers(rollout.generate, tokenizer) == {p: (expected[p], 6) for p in PROMPTS}
    seen = watcher.stop()
    states = enumerate([v1, v2, v3, v4, v5, v6], 1)
    references = {v: reference_answers(model_dir, s, tokenizer, PROMPTS[:1])[PROMPTS[0]] for v, s in states}
    assert_only_right_answers(seen, references)


@pytest.mark.parametrize("streams", [1, 2])
def test_patches_spanning_many_chunks_in_any_order(rollout: Rollout, trained_state, streams: int) -> None:  # type: ignore[no-untyped-def]
    """Small chunks: patches straddle chunk boundaries; two streams deliver chunks out of order."""
    v1 = bf16(trained_state)
    v2 = bump(v1, 0.05, seed=61)
    with Publisher([rollout.address], progress=False, delta=True, chunk_bytes=4096, streams=streams) as publisher:
        assert publisher.push(v1, 1)[0].ok
        [result] = publisher.push(v2, 2)
    assert result.ok and result.delta, result.error
    assert result.bytes_sent > 20 * 4096
    assert_serves(rollout, v2, 2)


class TamperingProxy:
    """A WeightSync hop that flips one value in the first patch of every delta, fixing the chunk checksums.

    Chunk checks pass; only the tensor checksum after applying the patch can catch it. Full updates and
    everything else pass through untouched.
    """

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 65 << 20)])
        self.tampered = 0
        self._plans: dict[str, tuple[int, int]] = {}  # update id -> (chunk bytes, wire offset of the byte to flip)
        service = "weightsync.v1.WeightSync"
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(self._forward(name))
            for name in ("GetStatus", "Commit", "AbortUpdate")
        }
        handlers["BeginUpdate"] = grpc.unary_unary_rpc_method_handler(self._begin)
        handlers["PushChunks"] = grpc.stream_unary_rpc_method_handler(self._chunks)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(8), options=[("grpc.max_receive_message_length", 65 << 20)]
        )
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, handlers)])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _call(self, name: str, stream: bool = False):  # type: ignore[no-untyped-def]
        make = self.channel.stream_unary if stream else self.channel.unary_unary
        return make(f"/weightsync.v1.WeightSync/{name}", request_serializer=None, response_deserializer=None)

    def _forward(self, name: str):  # type: ignore[no-untyped-def]
        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                return self._call(name)(request, timeout=30)
            except grpc.RpcError as error:
                _relay_error(context, error)

        return forward

    def _begin(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        message = pb.BeginUpdateRequest.FromString(request)
        try:
            answer = self._call("BeginUpdate")(request, timeout=30)
        except grpc.RpcError as error:
            _relay_error(context, error)
        update_id = pb.BeginUpdateResponse.FromString(answer).update_id
        for transfer in message.plan.tensors:
            if transfer.encoding == pb.TENSOR_ENCODING_PATCH and transfer.wire_bytes > delta.HEADER.size:
                self._plans[update_id] = (message.chunk_bytes, transfer.wire_offset + delta.HEADER.size)
                break
        return answer

    def _chunks(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        def rewritten() -> Iterator[bytes]:
            for message in requests:
                chunk = wire.decode_chunk(message)
                plan = self._plans.get(chunk.update_id)
                if plan is not None and chunk.index == plan[1] // plan[0]:
                    data = bytearray(chunk.data)
                    data[plan[1] % plan[0]] ^= 0x01  # the low bit of a new bf16 value
                    self.tampered += 1
                    message = wire.encode_chunk(chunk.update_id.encode(), chunk.index, [memoryview(bytes(data))])
                yield message

        try:
            return self._call("PushChunks", stream=True)(rewritten(), timeout=60)
        except grpc.RpcError as error:
            _relay_error(context, error)

    def close(self) -> None:
        self.server.stop(0)
        self.channel.close()


def _relay_error(context: grpc.ServicerContext, error: grpc.RpcError) -> None:
    """Passes the rollout's status on whole: code, message and the reason in its details."""
    context.set_trailing_metadata(error.trailing_metadata())  # type: ignore[attr-defined]
    context.abort(error.code(), error.details())  # type: ignore[attr-defined]


def test_tampered_patch_is_refused_and_the_full_version_commits(
    rollout: Rollout, model_dir, tokenizer, trained_state
) -> None:  # type: ignore[no-untyped-def]
    v1 = bf16(trained_state)
    v2 = bump(v1, 0.01, seed=7)
    proxy = TamperingProxy(rollout.address)
    try:
        with Publisher([proxy.address], progress=False, delta=True) as publisher:
            assert publisher.push(v1, 1)[0].ok
            watcher = Watcher(rollout.generate, tokenizer)
            [result] = publisher.push(v2, 2)  # the delta is tampered, refused at commit, then sent in full
            seen = watcher.stop()
    finally:
        proxy.close()
    assert proxy.tampered == 1
    assert result.ok and not result.delta, result.error  # the answer of the automatic full push
    assert_serves(rollout, v2, 2)
    expected = reference_answers(model_dir, v2, tokenizer)
    assert answers(rollout.generate, tokenizer) == {p: (expected[p], 2) for p in PROMPTS}
    first = reference_answers(model_dir, v1, tokenizer, PROMPTS[:1])[PROMPTS[0]]
    assert_only_right_answers(seen, {1: first, 2: expected[PROMPTS[0]]})


def test_patch_against_the_wrong_base_is_refused(rollout: Rollout, model_dir, tokenizer, trained_state) -> None:  # type: ignore[no-untyped-def]
    v1 = bf16(trained_state)
    other = bump(v1, 0.05, seed=11)  # pushed by a second trainer behind the first one's back
    v3, v4 = bump(v1, 0.01, seed=12), bump(v1, 0.02, seed=13)
    with Publisher([rollout.address], progress=False, delta=True) as trainer:
        assert trainer.push(v1, 1)[0].ok
        with Publisher([rollout.address], progress=False) as second:
            assert second.push(other, 2)[0].ok
        # The trainer still believes the rollout holds v1: its delta is refused at BeginUpdate, then sent in full.
        [result] = trainer.push(v3, 3)
        assert result.ok and not result.delta, result.error
        assert_serves(rollout, v3, 3)

        # A patch that claims the right base but was computed against another one: applied, then refused by
        # the tensor checksums; what Generate serves never changes.
        before = answers(rollout.generate, tokenizer)
        tensors, manifest = raw.prepare(v4)
        diffs = [delta.diff_tensor(t, v1[name]) for name, t in zip(v4, tensors, strict=True)]
        payloads = [memoryview(d.patch) if d.patch else tensor_bytes(t) for d, t in zip(diffs, tensors, strict=True)]
        plan = delta.TransferPlan.of_sizes(
            [delta.Encoding.PATCH if d.patch else delta.Encoding.FULL for d in diffs], [p.nbytes for p in payloads]
        )
        request = pb.BeginUpdateRequest(
            version=4,
            manifest=wire.manifest_to_proto(manifest),
            chunk_bytes=raw.CHUNK,
            fingerprint=manifest.fingerprint,
            base_fingerprint=result.fingerprint,
            plan=wire.plan_to_proto(plan),
        )
        update_id = rollout.weight_sync.BeginUpdate(request, timeout=10).update_id
        chunks = [wire.encode_chunk(update_id.encode(), i, p) for i, p in wire.iter_wire_payloads(payloads, raw.CHUNK)]
        raw.push_chunks(rollout.channel, chunks)
        with pytest.raises(grpc.RpcError) as info:
            rollout.weight_sync.Commit(pb.CommitRequest(update_id=update_id), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(info.value) == Reason.FULL_VERSION_NEEDED, info.value.details()
        assert answers(rollout.generate, tokenizer) == before
        assert_serves(rollout, v3, 3)

        # The spare was written by the refused delta; the trainer's next delta still lands bit-identical.
        [result] = trainer.push(v4, 5)
        assert result.ok and result.delta, result.error
        assert_serves(rollout, v4, 5)
    expected = reference_answers(model_dir, v4, tokenizer)
    assert answers(rollout.generate, tokenizer) == {p: (expected[p], 5) for p in PROMPTS}


def test_a_delta_to_a_rollout_without_that_base_is_refused_by_status(rollout: Rollout, trained_state) -> None:  # type: ignore[no-untyped-def]
    """A rollout with nothing committed refuses any delta, naming what it holds."""
    v1 = bf16(trained_state)
    _, manifest = raw.prepare(v1)
    request = pb.BeginUpdateRequest(
        version=1,
        manifest=wire.manifest_to_proto(manifest),
        chunk_bytes=raw.CHUNK,
        fingerprint=manifest.fingerprint,
        base_fingerprint="sha256:" + "1" * 64,
        plan=wire.plan_to_proto(delta.TransferPlan.full(manifest)),
    )
    with pytest.raises(grpc.RpcError) as info:
        rollout.weight_sync.BeginUpdate(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(info.value) == Reason.FULL_VERSION_NEEDED, info.value.details()
    request.base_fingerprint = ""
    request.plan.tensors[0].encoding = pb.TENSOR_ENCODING_PATCH
    request.plan.tensors[0].wire_bytes = 24
    with pytest.raises(grpc.RpcError) as info:
        rollout.weight_sync.BeginUpdate(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def process_rollout(model_dir: Path) -> Iterator[list[RolloutProcess]]:
    """Rollout processes (torch engine) that tests kill and restart on the same port; all stopped at the end."""
    started: list[RolloutProcess] = []
    yield started
    for process in started:
        if process.process.poll() is None:
            process.kill()


def restart(model_dir: Path, started: list[RolloutProcess], port: int | None = None) -> RolloutProcess:
    if started:
        started[-1].kill()  # SIGKILL: no goodbye, its memory is gone
    process = RolloutProcess(model_dir, engine="torch", port=port, args=["--log-level", "WARNING"])
    started.append(process)
    return process


def status_of(address: str) -> pb.GetStatusResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.WeightSyncStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)


def test_restarted_rollout_gets_the_full_version_and_reconcile_restores_it(  # type: ignore[no-untyped-def]
    process_rollout: list[RolloutProcess], model_dir: Path, tokenizer, trained_state
) -> None:
    v1 = bf16(trained_state)
    v2, v3 = bump(v1, 0.01, seed=21), bump(v1, 0.02, seed=22)
    first = restart(model_dir, process_rollout)
    address, port = first.address, first.port
    with Publisher([address], progress=False, delta=True, timeout=30) as publisher:
        assert publisher.push(v1, 1)[0].ok
        [result] = publisher.push(v2, 2)
        assert result.ok and result.delta

        # A patch after a restart: the rollout holds nothing, refuses the delta, and gets the full version.
        restart(model_dir, process_rollout, port)
        [result] = publisher.push(v3, 3)
        assert result.ok and not result.delta, result.error
        assert (status_of(address).weight_version, status_of(address).fingerprint) == (3, result.fingerprint)

        # Restarted between training steps: reconcile brings it back to the latest version by itself.
        restart(model_dir, process_rollout, port)
        assert status_of(address).weight_version == 0
        [result] = publisher.reconcile()
        assert result.ok and not result.delta and result.version == 3
        assert publisher.reconcile() == []  # up to date: nothing to do
        assert publisher.push(bump(v3, 0.01, seed=23), 4)[0].delta  # and deltas resume
    expected = reference_answers(model_dir, bump(v3, 0.01, seed=23), tokenizer)
    assert answers(address, tokenizer) == {p: (expected[p], 4) for p in PROMPTS}


def test_background_reconcile_returns_a_restarted_rollout_to_serving(  # type: ignore[no-untyped-def]
    process_rollout: list[RolloutProcess], model_dir: Path, tokenizer, trained_state
) -> None:
    v1 = bf16(trained_state)
    v2 = bump(v1, 0.01, seed=31)
    first = restart(model_dir, process_rollout)
    with Publisher([first.address], progress=False, delta=True, reconcile_every=0.5, timeout=30) as publisher:
        assert publisher.push(v1, 1)[0].ok
        assert publisher.push(v2, 2)[0].delta
        restart(model_dir, process_rollout, first.port)
        deadline = time.monotonic() + 120
        while status_of(first.address).weight_version != 2:  # no push from here on: the publisher's thread does it
            assert time.monotonic() < deadline, "the restarted rollout was never reconciled"
            time.sleep(0.2)
    assert status_of(first.address).fingerprint == manifest_of_state(v2).fingerprint
    expected = reference_answers(model_dir, v2, tokenizer)
    assert answers(first.address, tokenizer) == {p: (expected[p], 2) for p in PROMPTS}


def test_push_cli_with_base_sends_a_delta(rollout: Rollout, trained_state, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    v1 = bf16(trained_state)
    v2 = bump(v1, 0.01, seed=41)
    save_file(v1, tmp_path / "v1.safetensors")
    save_file(v2, tmp_path / "v2.safetensors")

    def push(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "trainer_side", "push", "--rollouts", rollout.address, *args]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)

    done = push("--checkpoint", str(tmp_path / "v1.safetensors"), "--version", "1")
    assert done.returncode == 0, done.stderr
    done = push(
        "--checkpoint", str(tmp_path / "v2.safetensors"), "--version", "2", "--base", str(tmp_path / "v1.safetensors")
    )
    assert done.returncode == 0, done.stderr
    assert "as a delta of" in done.stdout
    assert_serves(rollout, v2, 2)
    # A --base the rollout does not hold: the full version, same exit code.
    done = push(
        "--checkpoint", str(tmp_path / "v1.safetensors"), "--version", "3", "--base", str(tmp_path / "v1.safetensors")
    )
    assert done.returncode == 0, done.stderr
    assert "as a delta" not in done.stdout
    assert_serves(rollout, v1, 3)


def test_vllm_engine_takes_deltas(loop_thread: LoopThread, model_dir: Path, tokenizer, trained_state) -> None:  # type: ignore[no-untyped-def]
    """vLLM copies out of the staging buffer it is handed: the spare is the committed version, for free."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from rollout_side.engines.vllm_engine import VllmEngine
    from rollout_side.server import create_server
    from rollout_side.update.receiver import Receiver

    async def start() -> object:
        receiver = Receiver(VllmEngine(model_dir, kv_cache_space_gib=0.25))
        await receiver.start(None, 1)
        return await create_server(receiver, address="127.0.0.1:0", model=str(model_dir))

    rollout = Rollout(loop_thread, loop_thread.run(start(), timeout=300))  # type: ignore[arg-type]
    try:
        v1 = bf16(trained_state)
        v2, v3 = bump(v1, 0.01, seed=51), bump(v1, 0.03, seed=52)
        with Publisher([rollout.address], progress=False, delta=True) as publisher:
            assert publisher.push(v1, 1)[0].ok
            for version, state in [(2, v2), (3, v3)]:
                [result] = publisher.push(state, version)
                assert result.ok and result.delta, result.error
                assert result.fingerprint == manifest_of_state(state).fingerprint
        expected = reference_answers(model_dir, v3, tokenizer)
        assert answers(rollout.generate, tokenizer) == {p: (expected[p], 3) for p in PROMPTS}
    finally:
        rollout.channel.close()
        loop_thread.run(rollout.server.stop(grace=0), timeout=120)
