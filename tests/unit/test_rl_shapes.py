"""Pure helpers of issue 16: joining streamed pieces, OpenAI prompt shapes, SSE tagging, per-completion seeds."""

from __future__ import annotations

import json

import pytest

from rollout_side.engines.base import Completion, Sampling, join_pieces
from rollout_side.serving.generation import _each
from rollout_side.serving.openai_api import HttpError, _cut, _prompts
from rollout_side.serving.vllm_openai import Versions, _tag


def piece(ids: list[int], version: int, finish: str = "", logprobs: list[float] | None = None) -> Completion:
    return Completion(token_ids=ids, text="", weight_version=version, finish_reason=finish, logprobs=logprobs)


def test_join_pieces_keeps_one_version_unless_tokens_span_versions() -> None:
    one = join_pieces([piece([1], 3, logprobs=[-0.1]), piece([2, 3], 3, "length", [-0.2, -0.3])], "abc")
    assert one.token_ids == [1, 2, 3] and one.weight_version == 3 and one.finish_reason == "length"
    assert one.logprobs == [-0.1, -0.2, -0.3] and one.token_versions == [] and one.text == "abc"
    mixed = join_pieces([piece([1], 3), piece([2], 4), piece([], 4, "length")], "")
    assert mixed.weight_version == 3 and mixed.token_versions == [3, 4] and mixed.logprobs is None
    aborted = join_pieces([piece([5], 2), piece([], 2, "abort")], "x")
    assert aborted.finish_reason == "abort" and aborted.token_ids == [5]


def test_each_completion_gets_seed_plus_index_like_vllm() -> None:
    assert [s.seed for s in _each(Sampling(seed=7), 3)] == [7, 8, 9]
    assert [s.seed for s in _each(Sampling(), 2)] == [None, None]
    assert _each(Sampling(seed=1), 0) == [Sampling(seed=1)]


def test_openai_prompt_shapes() -> None:
    assert _prompts("hi") == ["hi"]
    assert _prompts([1, 2]) == [[1, 2]]
    assert _prompts(["a", "b"]) == ["a", "b"]
    assert _prompts([[1], [2, 3]]) == [[1], [2, 3]]
    for bad in ("", [], [1, "a"], [[]], None, 3):
        with pytest.raises(HttpError):
            _prompts(bad)


def test_stop_cut_and_sse_tagging() -> None:
    assert _cut("one two three", [" three", " two"]) == "one"
    assert _cut("one", ["x"]) == "one"
    event = _tag('data: {"id": "x", "choices": []}\n\n', Versions(1, per_prompt=False), 4)
    assert json.loads(event.split("\n")[0][6:]) == {"id": "x", "choices": [], "weight_version": 4}
    assert _tag("data: [DONE]\n\n", Versions(1, per_prompt=False), 4) == "data: [DONE]\n\n"
    # Completions of two prompts (n=2 each), admitted on versions 5 and 6: each choice says its own.
    versions = Versions(2, per_prompt=True)
    versions.admitted("cmpl-x-0", 5)
    versions.admitted("cmpl-x-1", 6)
    choices = [{"index": i} for i in range(4)]
    tagged = json.loads(_tag(json.dumps({"choices": choices}).join(["data: ", "\n\n"]), versions, 1)[6:].strip())
    assert [c["weight_version"] for c in tagged["choices"]] == [5, 5, 6, 6] and tagged["weight_version"] == 5
