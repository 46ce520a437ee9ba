"""Version spans (vLLM 0.33's return_weight_versions shape) and the TRL rollout's grouping of prompts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rollout_side.serving.openai_schema import weight_versions
from weightsync.spans import Span, version_spans


@pytest.mark.parametrize(
    ("versions", "spans"),
    [
        ([], []),
        ([3], [(3, 0, 1)]),
        ([3, 3, 3], [(3, 0, 3)]),
        ([3, 3, 4, 4, 4], [(3, 0, 2), (4, 2, 5)]),
        ([1, 2, 1], [(1, 0, 1), (2, 1, 2), (1, 2, 3)]),
    ],
)
def test_spans_cover_every_token_once(versions: list[int], spans: list[tuple[int, int, int]]) -> None:
    assert version_spans(versions) == [Span(version=v, start=s, end=e) for v, s, e in spans]
    covered = [i for span in version_spans(versions) for i in range(span.start, span.end)]
    assert covered == list(range(len(versions)))


def test_streamed_spans_count_from_the_choices_first_token() -> None:
    assert weight_versions([7, 7], offset=5) == [{"version": 7, "start": 5, "end": 7}]


def test_trl_rollout_asks_once_per_repeated_prompt_with_the_trainers_sampling() -> None:
    pytest.importorskip("trl")
    from trainer_side.integrations.trl import _runs, sampling

    chat = [{"role": "user", "content": "hi"}]
    assert _runs(["a", "a", "b", "b", "a"]) == [("a", 2), ("b", 2), ("a", 1)]
    assert _runs([chat, chat]) == [(chat, 2)]
    args = SimpleNamespace(
        max_completion_length=8,
        temperature=0.7,
        top_p=0.9,
        top_k=5,
        min_p=None,
        repetition_penalty=1.1,
        generation_kwargs={"stop": "\n", "seed": 3},
    )
    assert sampling(SimpleNamespace(args=args)) == {
        "max_tokens": 8,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "min_p": 0.0,
        "repetition_penalty": 1.1,
        "stop": ["\n"],
        "stop_token_ids": [],
        "seed": 3,
    }
