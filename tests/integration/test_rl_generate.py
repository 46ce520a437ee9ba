"""Generate for RL on the torch engine: logprobs against transformers, n completions by seed, stop, swap policies."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from rollout_side.engines.torch_engine import TorchEngine
from rollout_side.server import create_server
from rollout_side.update.receiver import Receiver
from trainer_side.publisher import Publisher
from weightsync.v1 import weightsync_pb2 as pb

from conftest import LoopThread, Rollout

PROMPTS = ["the cat sat", "monday tuesday", "one two three"]


def boot(loop: LoopThread, model_dir: Path, weights: Path | None = None, swap_policy: str = "drain") -> Rollout:
    async def start() -> Any:
        receiver = Receiver(TorchEngine(model_dir, swap_policy=swap_policy))
        await receiver.start(weights, 1)
        return await create_server(receiver, address="127.0.0.1:0", model=str(model_dir))

    return Rollout(loop, loop.run(start()))


def stop(loop: LoopThread, rollout: Rollout) -> None:
    rollout.channel.close()
    loop.run(rollout.server.stop(grace=0))


def hf_model(model_dir: Path, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """transformers on the bf16 weights the rollout serves (built in bf16, as from_pretrained does)."""
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()})
    return model.eval()


def hf_greedy(
    model: PreTrainedModel, prompt_ids: list[int], max_tokens: int, *, ignore_eos: bool = False
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the log-softmax of the raw logits at each step (transformers' own KV-cached loop)."""
    extra: dict[str, Any] = {"eos_token_id": None} if ignore_eos else {}
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **extra,
        )
    tokens: list[int] = out.sequences[0, len(prompt_ids) :].tolist()
    logp = torch.log_softmax(torch.stack([step[0].float() for step in out.logits]), dim=-1)
    return tokens, logp


@pytest.fixture(scope="module")
def served(loop_thread: LoopThread, model_dir: Path, trained_checkpoint: Path) -> Iterator[Rollout]:
    """A torch rollout serving the trained checkpoint as version 1 (standalone)."""
    rollout = boot(loop_thread, model_dir, trained_checkpoint)
    yield rollout
    stop(loop_thread, rollout)


@pytest.fixture(scope="module")
def reference(model_dir: Path, trained_state: dict[str, torch.Tensor]) -> PreTrainedModel:
    return hf_model(model_dir, trained_state)


def ids_of(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logprobs_and_top_logprobs_equal_transformers_log_softmax(
    served: Rollout, reference: PreTrainedModel, tokenizer: Any, prompt: str
) -> None:
    ids = ids_of(tokenizer, prompt)
    reply = served.generate.Generate(
        pb.GenerateRequest(prompt_token_ids=ids, max_tokens=12, logprobs=True, top_logprobs=5), timeout=60
    )
    tokens, logp = hf_greedy(reference, ids, 12)
    assert list(reply.token_ids) == tokens[: len(reply.token_ids)]
    assert len(reply.logprobs) == len(reply.token_ids) == len(reply.top_logprobs)
    for step, (token, value, top) in enumerate(zip(reply.token_ids, reply.logprobs, reply.top_logprobs, strict=True)):
        assert abs(value - float(logp[step, token])) < 1e-3
        best = torch.topk(logp[step], 5)
        assert top.token_ids[0] == token  # greedy: the sampled token is the best one
        assert list(top.logprobs) == pytest.approx(best.values.tolist(), abs=1e-3)
    assert reply.completions[0].logprobs == reply.logprobs


def test_sampled_logprobs_are_raw_not_temperature_scaled(
    served: Rollout, reference: PreTrainedModel, tokenizer
) -> None:  # type: ignore[no-untyped-def]
    """As vLLM's default (raw_logprobs): log-softmax of the model's logits, before temperature and top_p."""
    ids = ids_of(tokenizer, PROMPTS[0])
    reply = served.generate.Generate(
        pb.GenerateRequest(prompt_token_ids=ids, max_tokens=8, temperature=2.0, top_p=0.9, seed=3, logprobs=True),
        timeout=60,
    )
    with torch.no_grad():
        logits = reference(torch.tensor([ids + list(reply.token_ids)])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)[len(ids) - 1 : -1]
    expected = [float(logp[i, t]) for i, t in enumerate(reply.token_ids)]
    assert list(reply.logprobs) == pytest.approx(expected, abs=2e-2)  # cached vs one-pass bf16 forward


def test_n_completions_are_reproducible_by_seed(served: Rollout, tokenizer) -> None:  # type: ignore[no-untyped-def]
    request = pb.GenerateRequest(prompt="the cat", max_tokens=10, temperature=2.0, seed=7, n=4, logprobs=True)
    first = served.generate.Generate(request, timeout=60)
    again = served.generate.Generate(request, timeout=60)
    assert [c.index for c in first.completions] == [0, 1, 2, 3]
    assert [list(c.token_ids) for c in first.completions] == [list(c.token_ids) for c in again.completions]
    assert [list(c.logprobs) for c in first.completions] == [list(c.logprobs) for c in again.completions]
    assert len({tuple(c.token_ids) for c in first.completions}) > 1  # different seeds, different samples
    assert list(first.token_ids) == list(first.completions[0].token_ids)
    # Completion i is the single completion with seed + i (vLLM's rule for parallel sampling).
    single = served.generate.Generate(
        pb.GenerateRequest(prompt="the cat", max_tokens=10, temperature=2.0, seed=9), timeout=60
    )
    assert list(single.token_ids) == list(first.completions[2].token_ids)


def test_n_streams_interleave_by_index_and_equal_the_unary_answer(served: Rollout) -> None:
    request = pb.GenerateRequest(prompt="one two", max_tokens=6, temperature=1.0, seed=1, n=3, logprobs=True)
    unary = served.generate.Generate(request, timeout=60)
    streamed: dict[int, list[int]] = {0: [], 1: [], 2: []}
    logprobs: dict[int, list[float]] = {0: [], 1: [], 2: []}
    finished = set()
    for message in served.generate.GenerateStream(pb.GenerateStreamRequest(request=request), timeout=60):
        streamed[message.index] += message.token_ids
        logprobs[message.index] += message.logprobs
        if message.finish_reason:
            finished.add(message.index)
    assert finished == {0, 1, 2}
    assert [streamed[i] for i in range(3)] == [list(c.token_ids) for c in unary.completions]
    assert [logprobs[i] for i in range(3)] == [list(c.logprobs) for c in unary.completions]


def test_stop_strings_and_stop_token_ids(served: Rollout) -> None:
    plain = served.generate.Generate(pb.GenerateRequest(prompt="monday", max_tokens=12), timeout=60)
    words = plain.text.split()
    assert len(words) >= 3, plain.text
    stop_word = " " + words[2]
    cut = served.generate.Generate(pb.GenerateRequest(prompt="monday", max_tokens=12, stop=[stop_word]), timeout=60)
    assert cut.finish_reason == "stop"
    assert cut.text == plain.text[: plain.text.index(stop_word)]
    assert list(cut.token_ids) == list(plain.token_ids[: len(cut.token_ids)])
    by_id = served.generate.Generate(
        pb.GenerateRequest(prompt="monday", max_tokens=12, stop_token_ids=[plain.token_ids[2]]), timeout=60
    )
    plain_ids = list(plain.token_ids)
    assert list(by_id.token_ids) == plain_ids[: plain_ids.index(plain_ids[2]) + 1]
    assert by_id.finish_reason == "stop"


def test_old_requests_get_old_answers_plus_one_completion(served: Rollout) -> None:
    reply = served.generate.Generate(pb.GenerateRequest(prompt="the cat", max_tokens=4), timeout=60)
    assert len(reply.token_ids) == 4 and not reply.logprobs and not reply.token_weight_versions
    assert len(reply.completions) == 1 and reply.completions[0].text == reply.text


@pytest.mark.parametrize("field", [{"top_logprobs": 21}, {"temperature": 2.5}], ids=["top_logprobs", "temperature"])
def test_top_logprobs_over_20_and_temperature_over_2_are_invalid(served: Rollout, field: dict[str, Any]) -> None:
    """vLLM's limits (max_logprobs 20, temperature within [0, 2]): both engines refuse alike."""
    with pytest.raises(grpc.RpcError) as info:
        served.generate.Generate(pb.GenerateRequest(prompt="the cat", **field), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# Swap policies: a long generation in flight while a trainer pushes version 2.

LONG = 400


def perturbed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Version 2: version 1 plus a little noise, tied tensors kept tied."""
    generator = torch.Generator().manual_seed(5)
    out = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in state.items() if k != "lm_head.weight"}
    if "lm_head.weight" in state:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def long_generation_with_push(
    rollout: Rollout, prompt_ids: list[int], state2: dict[str, torch.Tensor]
) -> tuple[list[pb.GenerateStreamResponse], float, float]:
    """Streams a long greedy generation; pushes version 2 after its first token. Returns the messages,
    how long the push took and how long the whole generation took."""
    request = pb.GenerateRequest(prompt_token_ids=prompt_ids, max_tokens=LONG, ignore_eos=True)
    started = time.perf_counter()
    stream = rollout.generate.GenerateStream(pb.GenerateStreamRequest(request=request), timeout=120)
    messages = [next(stream)]
    push_seconds: list[float] = []

    def push() -> None:
        began = time.perf_counter()
        with Publisher([rollout.address], progress=False) as publisher:
            [result] = publisher.push(state2, version=2)
        assert result.ok, result
        push_seconds.append(time.perf_counter() - began)

    pusher = threading.Thread(target=push)
    pusher.start()
    messages += list(stream)
    generation_seconds = time.perf_counter() - started
    pusher.join(120)
    return messages, push_seconds[0], generation_seconds


@pytest.mark.parametrize("policy", ["drain", "abort", "continue"])
def test_swap_policy_with_a_long_generation_in_flight(
    loop_thread: LoopThread, model_dir: Path, trained_checkpoint: Path, trained_state, tokenizer, policy: str
) -> None:  # type: ignore[no-untyped-def]
    rollout = boot(loop_thread, model_dir, trained_checkpoint, swap_policy=policy)
    try:
        state2 = perturbed(trained_state)
        prompt = ids_of(tokenizer, "the cat sat")
        messages, _push_seconds, _generation_seconds = long_generation_with_push(rollout, prompt, state2)
        tokens = [t for m in messages for t in m.token_ids]
        versions = [m.weight_version for m in messages for _ in m.token_ids]
        finish = messages[-1].finish_reason
        v1_tokens, _ = hf_greedy(hf_model(model_dir, trained_state), prompt, LONG, ignore_eos=True)
        if policy == "drain":  # one version; the push waited for the generation
            assert finish == "length" and tokens == v1_tokens and set(versions) == {1}
        elif policy == "abort":  # ended promptly at the swap, the tokens so far all from version 1
            assert finish == "abort" and 0 < len(tokens) < LONG and set(versions) == {1}
            assert tokens == v1_tokens[: len(tokens)]
            # Ended by the swap (finish "abort", fewer than LONG tokens): the push did not wait for it. No
            # timing: the load and installed-weight check after the swap are the push's alone.
        else:  # went on with version 2; each token matches its version's reference
            assert finish == "length" and len(tokens) == LONG
            switch = versions.index(2)
            assert 0 < switch < LONG and versions == [1] * switch + [2] * (LONG - switch)
            assert tokens[:switch] == v1_tokens[:switch]
            v2_tokens, _ = hf_greedy(
                hf_model(model_dir, state2), prompt + tokens[:switch], LONG - switch, ignore_eos=True
            )
            assert tokens[switch:] == v2_tokens
            reply = rollout.generate.Generate(
                pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=3, ignore_eos=True), timeout=60
            )
            assert reply.weight_version == 2 and not reply.token_weight_versions
        # After the swap every new request runs on version 2.
        status = rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=10)
        assert status.weight_version == 2
    finally:
        stop(loop_thread, rollout)


def test_continue_tags_each_token_of_a_unary_response(
    loop_thread: LoopThread, model_dir: Path, trained_checkpoint: Path, trained_state, tokenizer
) -> None:  # type: ignore[no-untyped-def]
    rollout = boot(loop_thread, model_dir, trained_checkpoint, swap_policy="continue")
    try:
        request = pb.GenerateRequest(prompt="the cat", max_tokens=LONG, ignore_eos=True, logprobs=True)
        future = rollout.generate.Generate.future(request, timeout=120)
        time.sleep(0.3)
        with Publisher([rollout.address], progress=False) as publisher:
            assert publisher.push(perturbed(trained_state), version=2)[0].ok
        reply = future.result()
        assert reply.weight_version == 1
        assert len(reply.token_weight_versions) == len(reply.token_ids) == len(reply.logprobs) == LONG
        assert set(reply.token_weight_versions) == {1, 2}
        assert list(reply.completions[0].token_weight_versions) == list(reply.token_weight_versions)
    finally:
        stop(loop_thread, rollout)
