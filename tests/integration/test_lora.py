"""LoRA adapters pushed as versions to a torch rollout over real sockets: exact answers, refusals, bytes, resume, swaps.

The rollout boots on dummy weights and takes the base as a full push; each adapter version after it
must answer exactly what transformers + PEFT (merged) answer with the same base and adapter.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from peft import LoraConfig
from safetensors.torch import save_file

from rollout_side.serving.openai_api import start_http
from trainer_side.publisher import Publisher
from weightsync import wire
from weightsync.adapter import AdapterConfig
from weightsync.errors import Reason
from weightsync.manifest import PIECE_BYTES, manifest_of_state
from weightsync.v1 import weightsync_pb2 as pb

import raw
from conftest import Rollout
from lora import MAX_TOKENS, PROMPTS, Adapter, answers, prompt_ids, swap_under_load, three_adapters
from proxy import Proxy


@pytest.fixture(scope="module")
def made(model_dir: Path, trained_state, tokenizer) -> tuple[dict[str, list[int]], list[Adapter]]:  # type: ignore[no-untyped-def]
    return three_adapters(model_dir, trained_state, tokenizer)


@pytest.fixture
def adapters(made) -> list[Adapter]:  # type: ignore[no-untyped-def]
    return made[1]


@pytest.fixture
def plain(made) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    return made[0]


@pytest.fixture
def based(rollout: Rollout, trained_state) -> Iterator[tuple[Publisher, str]]:  # type: ignore[no-untyped-def]
    """The rollout serving trained_state as version 1 (its base), and the publisher that pushed it."""
    with Publisher([rollout.address]) as publisher:
        [result] = publisher.push(trained_state, 1)
        assert result.ok, result.line()
        yield publisher, result.fingerprint


def status(rollout: Rollout) -> pb.GetStatusResponse:
    answer: pb.GetStatusResponse = rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=10)
    return answer


def test_three_adapter_versions_answer_as_transformers_plus_peft(  # type: ignore[no-untyped-def]
    rollout: Rollout, based, adapters: list[Adapter], plain, tokenizer, trained_state
) -> None:
    publisher, base = based
    for version, adapter in enumerate(adapters, start=2):
        [result] = publisher.push_adapter(adapter.state, adapter.config, version)
        assert result.ok, result.line()
        assert result.fingerprint == manifest_of_state(adapter.state).fingerprint
        got = answers(rollout.generate, tokenizer)
        assert got == {p: (adapter.reference[p], version) for p in PROMPTS}
        now = status(rollout)
        assert (now.weight_version, now.adapter_version, now.base_fingerprint) == (version, version, base)
    # A full version after adapters drops the adapter: it is served as pushed, and is the base from then on.
    [result] = publisher.push(trained_state, 5)
    assert result.ok, result.line()
    assert answers(rollout.generate, tokenizer) == {p: (plain[p], 5) for p in PROMPTS}
    now = status(rollout)
    assert (now.adapter_version, now.base_fingerprint) == (0, base)


def test_every_reply_says_the_adapter_version_and_base_that_answered(  # type: ignore[no-untyped-def]
    rollout: Rollout, based, adapters: list[Adapter], tokenizer
) -> None:
    """Generate, each of its n completions, GenerateStream's messages and the HTTP face (with
    return_weight_versions) name the adapter version and its base, or adapter version 0 for a full one."""
    publisher, base = based
    ids = prompt_ids(tokenizer, PROMPTS[0])
    request = pb.GenerateRequest(prompt_token_ids=ids, max_tokens=MAX_TOKENS, n=2)
    http = rollout.loop.run(start_http(rollout.server.generation, host="127.0.0.1", port=0, model="tiny"))
    url = f"http://127.0.0.1:{http.port}/v1/completions"
    body = {"model": "tiny", "prompt": ids, "max_tokens": MAX_TOKENS, "return_weight_versions": True}
    try:
        for version, adapter_version in ((1, 0), (2, 2)):
            if version == 2:
                assert publisher.push_adapter(adapters[0].state, adapters[0].config, 2)[0].ok
            reply = rollout.generate.Generate(request, timeout=60)
            said = {(reply.weight_version, reply.adapter_version, reply.base_fingerprint)}
            said |= {(c.weight_version, c.adapter_version, c.base_fingerprint) for c in reply.completions}
            stream = rollout.generate.GenerateStream(pb.GenerateStreamRequest(request=request), timeout=60)
            said |= {(m.weight_version, m.adapter_version, m.base_fingerprint) for m in stream}
            [choice] = httpx.post(url, json=body, timeout=60).json()["choices"]
            said.add((choice["weight_version"], choice["adapter_version"], choice["base_fingerprint"]))
            assert said == {(version, adapter_version, base)}
    finally:
        rollout.loop.run(http.stop())


def test_an_adapter_for_another_base_is_refused_and_generate_keeps_serving(  # type: ignore[no-untyped-def]
    rollout: Rollout, based, adapters: list[Adapter], tokenizer
) -> None:
    publisher, base = based
    assert publisher.push_adapter(adapters[0].state, adapters[0].config, 2)[0].ok
    [refused] = publisher.push_adapter(adapters[1].state, adapters[1].config, 3, base_fingerprint="sha256:" + "0" * 64)
    assert not refused.ok and refused.reason is Reason.ADAPTER_BASE_MISMATCH, refused.line()
    assert base in refused.error  # says which base it holds
    assert answers(rollout.generate, tokenizer) == {p: (adapters[0].reference[p], 2) for p in PROMPTS}
    assert status(rollout).state == pb.ROLLOUT_STATE_SERVING


def test_an_adapter_push_sends_the_adapter_bytes_and_little_more(  # type: ignore[no-untyped-def]
    rollout: Rollout, based, adapters: list[Adapter]
) -> None:
    _, base = based
    proxy = Proxy(rollout.address)
    with Publisher([proxy.address]) as publisher:
        [result] = publisher.push_adapter(adapters[0].state, adapters[0].config, 2, base_fingerprint=base)
    assert result.ok, result.line()
    nbytes = adapters[0].nbytes
    assert proxy.sent <= nbytes * 1.02, f"{proxy.sent} bytes on the wire for a {nbytes}-byte adapter"


def test_an_interrupted_adapter_push_is_resumed(  # type: ignore[no-untyped-def]
    rollout: Rollout, based, adapters: list[Adapter], tokenizer
) -> None:
    """A trainer that died midway leaves the adapter update held; the next push of it sends only the rest."""
    _, base = based
    adapter, chunk = adapters[0], 16 << 10
    tensors, manifest = raw.prepare(adapter.state, PIECE_BYTES)  # the checksum kind a default push announces
    config = AdapterConfig.from_peft(adapter.config, adapter.state, base)
    begun = rollout.weight_sync.BeginUpdate(
        pb.BeginUpdateRequest(
            version=2,
            manifest=wire.manifest_to_proto(manifest),
            chunk_bytes=chunk,
            fingerprint=manifest.fingerprint,
            adapter=wire.adapter_to_proto(config),
        ),
        timeout=30,
    )
    messages = raw.encoded_chunks(begun.update_id, tensors, manifest, chunk)
    raw.push_chunks(rollout.channel, messages[: len(messages) // 2])  # the stream ends: interrupted
    assert status(rollout).receiving_version == 2
    with Publisher([rollout.address], chunk_bytes=chunk) as resumed:
        [result] = resumed.push_adapter(adapter.state, adapter.config, 2, base_fingerprint=base)
    assert result.ok, result.line()
    assert result.held_bytes == (len(messages) // 2) * chunk
    assert answers(rollout.generate, tokenizer) == {p: (adapter.reference[p], 2) for p in PROMPTS}


def test_generate_during_adapter_swaps_answers_as_the_version_it_claims(  # type: ignore[no-untyped-def]
    rollout: Rollout, based, adapters: list[Adapter], plain, tokenizer, trained_state
) -> None:
    """Every answer's tokens, adapter version and base fingerprint are those of the version it claims."""
    publisher, base = based
    seen, wrong = swap_under_load(publisher, rollout.generate, adapters, 2, tokenizer, (trained_state, plain, base))
    assert not wrong, wrong[:3]
    assert len(set(seen)) >= 4, "the answers should span several versions"


def test_push_adapter_command(rollout: Rollout, based, adapters: list[Adapter], tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`push --adapter DIR` takes what PEFT's save_pretrained writes; `status` names the base under it."""
    _, base = based
    LoraConfig(**{k: adapters[0].config[k] for k in ("r", "lora_alpha", "target_modules")}).save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in adapters[0].state.items()}, tmp_path / "adapter_model.safetensors")
    trainer = [sys.executable, "-m", "trainer_side"]
    push = ["push", "--adapter", str(tmp_path), "--base-fingerprint", base, "--version", "2"]
    pushed = subprocess.run(
        [*trainer, *push, "--rollouts", rollout.address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pushed.returncode == 0, pushed.stderr
    assert answers(rollout.generate, tokenizer) == {p: (adapters[0].reference[p], 2) for p in PROMPTS}
    shown = subprocess.run([*trainer, "status", "--rollouts", rollout.address], capture_output=True, text=True)
    assert f"adapter on base {base}" in shown.stdout, shown.stdout
