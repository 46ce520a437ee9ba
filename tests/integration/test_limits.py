"""Limits before work: what a hostile or careless caller can make a rollout spend, over real sockets.

Unauthenticated requests are refused before a byte of them is read; requests over their method's
size limit before they are parsed; prompts the model cannot take before they are tokenized, the same
on both engines; and a request whose caller is gone stops using the engine at once.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rollout_side.process import RolloutProcess
from trainer_side.publisher import Publisher
from trainer_side.train import new_model
from weightsync.errors import Reason, reason_of
from weightsync.limits import GENERATE_REQUEST_BYTES, MAX_UPDATE_ID_BYTES
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

from conftest import LoopThread, Rollout

TOKEN = "limits-test-token"
MIB = 1 << 20


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def big_begin_update(size: int) -> bytes:
    """A BeginUpdateRequest of about `size` bytes: a manifest of many plausible tensor entries."""
    spec = pb.TensorSpec(
        name="model.layers.0.self_attn.q_proj.weight",
        dtype=pb.ELEMENT_TYPE_BFLOAT16,
        shape=[256, 256],
        byte_size=256 * 256 * 2,
        checksum="xxh3_128:" + "0" * 32,
    ).SerializeToString()
    entry = b"\x0a" + varint(len(spec)) + spec
    manifest = entry * (size // len(entry))
    return pb.BeginUpdateRequest(version=2, chunk_bytes=1 << 20).SerializeToString() + (
        b"\x12" + varint(len(manifest)) + manifest
    )


def raw_unary(channel: grpc.Channel, method: str):  # type: ignore[no-untyped-def]
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def rss(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def health_seconds(channel: grpc.Channel) -> float:
    started = time.perf_counter()
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return time.perf_counter() - started


@pytest.fixture
def served(rollout: Rollout, trained_state) -> Rollout:  # type: ignore[no-untyped-def]
    with Publisher([rollout.address], progress=False) as publisher:
        assert publisher.push(trained_state, 1)[0].ok
    return rollout


# -- authentication and size before parsing ------------------------------------------------------


def test_wrong_token_begin_updates_with_large_manifests_cost_no_memory(model_dir, trained_state, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Six concurrent BeginUpdates with a wrong token and a 60 MiB manifest each: refused unread."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with RolloutProcess(model_dir, engine="torch", args=["--auth-token-file", str(token_file)]) as rollout:
        with Publisher([rollout.address], progress=False, token=TOKEN) as publisher:
            assert publisher.push(trained_state, 1)[0].ok
        payload = big_begin_update(60 * MIB)
        channel = grpc.insecure_channel(rollout.address)
        generate = pb_grpc.GenerateStub(channel)
        request = pb.GenerateRequest(prompt="the cat", max_tokens=4)
        for _ in range(3):  # warm: the first requests allocate what every later one reuses
            generate.Generate(request, timeout=30)
        before = rss(rollout.pid)
        codes: list[grpc.StatusCode] = []
        answers: list[int] = []
        peak = before
        done = threading.Event()

        def attack(token: str | None) -> None:
            metadata = [("authorization", f"Bearer {token}")] if token else []
            while not done.is_set():
                try:
                    raw_unary(channel, "/weightsync.v1.WeightSync/BeginUpdate")(payload, timeout=60, metadata=metadata)
                except grpc.RpcError as error:
                    codes.append(error.code())

        def serve_meanwhile() -> None:
            while not done.is_set():
                answers.append(generate.Generate(request, timeout=60).weight_version)

        attackers = [threading.Thread(target=attack, args=("wrong" if i % 2 else None,)) for i in range(6)]
        client = threading.Thread(target=serve_meanwhile)
        client.start()
        for t in attackers:
            t.start()
        # The attack lasts 3 s, and on a loaded machine until Generate has answered three times under it.
        started = time.monotonic()
        while time.monotonic() - started < 3.0 or (len(answers) < 3 and time.monotonic() - started < 120):
            peak = max(peak, rss(rollout.pid))
            time.sleep(0.02)
        done.set()
        for t in attackers:
            t.join(60)
        peak = max(peak, rss(rollout.pid))
        client.join(60)
        channel.close()
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
    assert len(codes) >= 6
    # Reading the six requests would cost >= 360 MiB (measured +543 MiB when auth ran after parsing). What
    # is left is each stream's flow-control window of unread bytes, pinned at 4 MiB (rollout_side/server.py
    # STREAM_WINDOW_BYTES): 19-38 MiB in all measured here; left to gRPC's BDP probing, 27-61 MiB.
    assert peak - before < 64 * MIB, f"RSS grew {(peak - before) / MIB:.0f} MiB"
    assert len(answers) >= 3 and set(answers) == {1}, answers


def test_oversized_requests_are_refused_unparsed_and_the_loop_stays_free(served: Rollout) -> None:
    """No auth configured: a BeginUpdate larger than any manifest of this model, and a huge Generate."""
    results: dict[str, grpc.RpcError] = {}

    def call(name: str, method: str, payload: bytes) -> None:
        try:
            raw_unary(served.channel, method)(payload, timeout=60)
        except grpc.RpcError as error:
            results[name] = error

    calls = [
        threading.Thread(
            target=call, args=("begin", "/weightsync.v1.WeightSync/BeginUpdate", big_begin_update(40 * MIB))
        ),
        threading.Thread(
            target=call,
            args=(
                "generate",
                "/weightsync.v1.Generate/Generate",
                pb.GenerateRequest(prompt="x" * (32 * MIB)).SerializeToString(),
            ),
        ),
    ]
    for t in calls:
        t.start()
    slowest = max(health_seconds(served.channel) for _ in range(10))
    for t in calls:
        t.join(60)
    for name in ("begin", "generate"):
        assert results[name].code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (name, results[name].details())
        assert reason_of(results[name]) == Reason.TOO_LARGE
    assert slowest < 2.0, f"health took {slowest:.1f} s while the big requests were refused"
    status = served.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
    assert (status.weight_version, status.update_id) == (1, "")


@pytest.mark.parametrize(
    "update_id", ["x" * (MAX_UPDATE_ID_BYTES + 1), "v2-abc\n2026-11-27 INFO rollout: forged line", "a b"]
)
def test_update_ids_are_bounded_and_plain(served: Rollout, trained_state, update_id: str) -> None:
    request = pb.BeginUpdateRequest(version=2, chunk_bytes=1 << 20, update_id=update_id)
    with pytest.raises(grpc.RpcError) as info:
        served.weight_sync.BeginUpdate(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(info.value) == Reason.BAD_REQUEST
    assert "\n" not in (info.value.details() or "") and len(info.value.details() or "") < 1024
    assert served.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5).update_id == ""


def test_a_long_tensor_name_is_not_echoed_whole(served: Rollout) -> None:
    spec = pb.TensorSpec(name="n" * 100_000, dtype=pb.ELEMENT_TYPE_BFLOAT16, shape=[1], byte_size=2)
    request = pb.BeginUpdateRequest(version=2, chunk_bytes=1 << 20, manifest=pb.Manifest(tensors=[spec], total_bytes=2))
    with pytest.raises(grpc.RpcError) as info:
        served.weight_sync.BeginUpdate(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert len(info.value.details() or "") <= 1024


# -- prompts: checked before tokenizing, the same on both engines ---------------------------------


def prompt_refusals(rollout: Rollout) -> dict[str, tuple[grpc.StatusCode, Reason | None]]:
    """What the rollout answers to each malformed prompt (every one must be INVALID_ARGUMENT)."""
    max_len, vocab = rollout.receiver.engine.max_model_len, rollout.receiver.engine.vocab_size
    cases = {
        "prompt over the model's length in characters": pb.GenerateRequest(prompt="cat " * (max_len * 10)),
        "prompt over the model's length in tokens": pb.GenerateRequest(prompt="the cat sat " * max_len),
        "token prompt over the model's length": pb.GenerateRequest(prompt_token_ids=[5] * (max_len + 1)),
        "token prompt at the model's length": pb.GenerateRequest(prompt_token_ids=[5] * max_len),
        "token id beyond the vocabulary": pb.GenerateRequest(prompt_token_ids=[5, vocab]),
        "NaN temperature": pb.GenerateRequest(prompt="red", temperature=math.nan),
        "infinite temperature": pb.GenerateRequest(prompt="red", temperature=math.inf),
        "NaN top_p": pb.GenerateRequest(prompt="red", top_p=math.nan, temperature=1.0),
    }
    out = {}
    for name, request in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            rollout.generate.Generate(request, timeout=60)
        out[name] = (info.value.code(), reason_of(info.value))
    return out


def check_refusals(refusals: dict[str, tuple[grpc.StatusCode, Reason | None]]) -> None:
    assert refusals == dict.fromkeys(refusals, (grpc.StatusCode.INVALID_ARGUMENT, Reason.BAD_REQUEST)), refusals


def test_malformed_prompts_are_invalid_argument_on_torch(served: Rollout) -> None:
    check_refusals(prompt_refusals(served))
    # Within the limits the same shapes of request are answered, capped at the model's length.
    engine = served.receiver.engine
    near = served.generate.Generate(
        pb.GenerateRequest(prompt_token_ids=[5] * (engine.max_model_len - 3), max_tokens=50), timeout=60
    )
    assert len(near.token_ids) <= 3 and near.weight_version == 1


def test_a_huge_prompt_is_refused_before_tokenizing_while_health_answers(served: Rollout) -> None:
    engine = served.receiver.engine
    tokenized: list[int] = []
    tokenize = engine.tokenize
    engine.tokenize = lambda text: tokenized.append(len(text)) or tokenize(text)  # type: ignore[method-assign]
    try:
        # Under the message limit, far over what the model's length can hold.
        prompt = "the cat sat on the mat " * ((GENERATE_REQUEST_BYTES - 4096) // 23)
        errors: list[grpc.RpcError] = []

        def ask() -> None:
            try:
                served.generate.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=16), timeout=60)
            except grpc.RpcError as error:
                errors.append(error)

        asking = threading.Thread(target=ask)
        asking.start()
        slowest = max(health_seconds(served.channel) for _ in range(10))
        asking.join(60)
        assert [(e.code(), reason_of(e)) for e in errors] == [(grpc.StatusCode.INVALID_ARGUMENT, Reason.BAD_REQUEST)]
        assert tokenized == [], "the prompt was tokenized before its length was checked"
        assert slowest < 2.0
        served.generate.Generate(pb.GenerateRequest(prompt="red", max_tokens=2), timeout=30)
        assert tokenized == [3], "a normal prompt is tokenized (by the engine, off the event loop)"
    finally:
        del engine.tokenize


# -- cancellation -------------------------------------------------------------------------------


LONG = 480  # tokens: well inside the tiny model's 512, several seconds of decoding on these machines


def long_request(tokenizer) -> pb.GenerateRequest:  # type: ignore[no-untyped-def]
    ids = tokenizer("once upon a time", add_special_tokens=False)["input_ids"]
    return pb.GenerateRequest(prompt_token_ids=ids, max_tokens=LONG)


def abandon(rollout: Rollout, request: pb.GenerateRequest, how: str, after: float) -> None:
    """Starts `request` and leaves it after `after` seconds: by deadline, or by cancelling its stream."""
    if how == "deadline":
        with pytest.raises(grpc.RpcError) as info:
            rollout.generate.Generate(request, timeout=after)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        return
    stream = rollout.generate.GenerateStream(pb.GenerateStreamRequest(request=request), timeout=120)
    next(stream)
    time.sleep(after)
    stream.cancel()


@pytest.mark.parametrize("how", ["deadline", "stream-cancel"])
def test_an_abandoned_generate_frees_the_torch_engine(rollout: Rollout, model_dir, tokenizer, how: str) -> None:  # type: ignore[no-untyped-def]
    with Publisher([rollout.address], progress=False) as publisher:  # random weights: no early end of text
        assert publisher.push(new_model(model_dir, seed=5).state_dict(), 1)[0].ok
    request = long_request(tokenizer)
    short = pb.GenerateRequest(prompt="red", max_tokens=2)
    started = time.perf_counter()
    whole = rollout.generate.Generate(request, timeout=120)
    full = time.perf_counter() - started  # how long the long request takes when it runs to its end
    assert len(whole.token_ids) == LONG, "the long request ended early: the comparison below proves nothing"

    started = time.perf_counter()
    abandon(rollout, request, how, full / 10)
    rollout.generate.Generate(short, timeout=120)
    waited = time.perf_counter() - started
    # Had the engine kept decoding the abandoned request, the short one would end after `full`.
    assert waited < full / 2, f"short request done {waited:.2f} s after the long one began; it takes {full:.2f} s"


# -- both engines: vLLM -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_served(loop_thread: LoopThread, model_dir: Path, trained_state) -> Iterator[Rollout]:  # type: ignore[no-untyped-def]
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from rollout_side.engines.vllm_engine import VllmEngine
    from rollout_side.server import create_server
    from rollout_side.update.receiver import Receiver

    async def start() -> object:
        receiver = Receiver(VllmEngine(model_dir, kv_cache_space_gib=0.25))
        await receiver.start()
        return await create_server(receiver, address="127.0.0.1:0", model=str(model_dir))

    rollout = Rollout(loop_thread, loop_thread.run(start(), timeout=300))  # type: ignore[arg-type]
    with Publisher([rollout.address], progress=False) as publisher:
        assert publisher.push(new_model(model_dir, seed=5).state_dict(), 1)[0].ok
    yield rollout
    rollout.channel.close()
    loop_thread.run(rollout.server.stop(grace=0), timeout=120)


@pytest.mark.vllm
def test_malformed_prompts_are_invalid_argument_on_vllm(vllm_served: Rollout) -> None:
    check_refusals(prompt_refusals(vllm_served))


@pytest.mark.vllm
@pytest.mark.parametrize("how", ["deadline", "stream-cancel"])
def test_an_abandoned_generate_frees_the_vllm_engine(vllm_served: Rollout, loop_thread, tokenizer, how: str) -> None:  # type: ignore[no-untyped-def]
    engine = vllm_served.receiver.engine
    llm = engine._llm  # type: ignore[attr-defined]

    def in_flight() -> int:
        async def count() -> int:
            return engine._gate._inflight + llm.output_processor.get_num_unfinished_requests()  # type: ignore[attr-defined,no-any-return]

        return loop_thread.run(count())

    request = long_request(tokenizer)
    started = time.perf_counter()
    whole = vllm_served.generate.Generate(request, timeout=120)
    full = time.perf_counter() - started
    assert len(whole.token_ids) == LONG, "the long request ended early: the comparison below proves nothing"

    started = time.perf_counter()
    abandon(vllm_served, request, how, full / 10)
    while in_flight() and time.perf_counter() - started < full:
        time.sleep(0.01)
    freed = time.perf_counter() - started
    assert in_flight() == 0 and freed < full / 2, f"vLLM still ran the request {freed:.2f} s later (full: {full:.2f} s)"
