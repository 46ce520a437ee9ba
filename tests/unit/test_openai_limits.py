"""The HTTP face's limits before work, as pure functions: each refusal's status and what it names."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import Request

from rollout_side.serving.openai_limits import (
    MAX_CHOICES,
    MAX_JSON_DEPTH,
    check_chat,
    check_completion,
    check_model,
    parse_json,
    read_json,
)
from rollout_side.serving.openai_schema import HttpError

MAX_MODEL_LEN = 512


def refusal(check: Any, *args: Any) -> tuple[int, str]:
    with pytest.raises(HttpError) as info:
        check(*args)
    return info.value.status, info.value.message


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"stop_token_ids": ["x"]}, "stop_token_ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids"),
        ({"seed": 2**70}, "seed"),
        ({"n": 0}, "n"),
        ({"n": 1.5}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": "1"}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"logprobs": True}, "logprobs"),
        ({"stream": 1}, "stream"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"stop": ["a", 1]}, "stop"),
        ({"stop": ["s"] * 65}, "stop"),
        ({"min_weight_version": -1}, "min_weight_version"),
        ({"min_weight_version": 2**53}, "min_weight_version"),
        ({"model": ["m"]}, "model"),
        ({"prompt": [[5]] * 65}, str(MAX_CHOICES)),
        ({"prompt": ["a", "b"], "n": 33}, str(MAX_CHOICES)),
    ],
)
def test_completion_fields_are_checked_by_type_and_range(body: dict[str, Any], named: str) -> None:
    status, message = refusal(check_completion, {"prompt": "x"} | body)
    assert status == 400 and named in message


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x"},
        {"prompt": [[5, 6]] * 4, "n": 16, "seed": -(2**63), "stop": "\n", "logprobs": 0, "model": None},
        {"prompt": [1, 2, 3], "n": MAX_CHOICES, "temperature": 0, "top_p": 1, "stream_options": {}},
    ],
)
def test_completion_bodies_within_the_limits_pass(body: dict[str, Any]) -> None:
    check_completion(body)


@pytest.mark.parametrize(
    ("messages", "named"),
    [
        ("hi", "messages"),
        ([], "messages"),
        (["hi"], "messages"),
        ([{"role": "user", "content": "hi"}] * (MAX_MODEL_LEN + 1), "messages"),
        ([{"role": "user", "content": "x" * (MAX_MODEL_LEN * 32 + 1)}], "characters"),
        ([{"role": "user", "content": [{"type": "text", "text": "x" * (MAX_MODEL_LEN * 32 + 1)}]}], "characters"),
    ],
)
def test_chat_messages_are_bounded_before_any_template(messages: Any, named: str) -> None:
    status, message = refusal(check_chat, {"messages": messages}, MAX_MODEL_LEN)
    assert status == 400 and named in message


def test_chat_fields() -> None:
    hi = {"messages": [{"role": "user", "content": "hi"}]}
    check_chat(hi | {"logprobs": True, "top_logprobs": 20, "max_completion_tokens": 5}, MAX_MODEL_LEN)
    assert refusal(check_chat, hi | {"logprobs": 3}, MAX_MODEL_LEN)[0] == 400
    assert refusal(check_chat, hi | {"top_logprobs": 21}, MAX_MODEL_LEN)[0] == 400
    assert refusal(check_chat, hi | {"n": MAX_CHOICES + 1}, MAX_MODEL_LEN)[0] == 400


def test_an_unknown_model_is_404() -> None:
    check_model({}, "tiny")
    check_model({"model": "tiny"}, "tiny")
    status, message = refusal(check_model, {"model": "gpt-4"}, "tiny")
    assert status == 404 and "gpt-4" in message


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[1]",
        "[" * 100_000 + "]" * 100_000,
        '{"a": ' + "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1) + "}",
        '{"a": "' + "x" * (1 << 20) + '", "b": ' + "[" * 70 + "]" * 70 + "}",
    ],
    ids=["malformed", "not an object", "past the recursion limit", "past MAX_JSON_DEPTH", "large and deep"],
)
def test_bodies_that_are_not_a_shallow_object_are_400(text: str) -> None:
    with pytest.raises(HttpError) as info:
        asyncio.run(parse_json(text.encode()))
    assert info.value.status == 400


def request(chunks: list[bytes], headers: dict[str, str]) -> Request:
    """A Starlette request whose body arrives in `chunks`; records how many were read."""
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        body = pending.pop(0) if pending else b""
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {"type": "http", "method": "POST", "path": "/", "headers": raw, "query_string": b""}
    req = Request(scope, receive)
    req.state.pending = pending
    return req


def test_a_declared_size_over_the_limit_is_413_with_nothing_read() -> None:
    req = request([b"{}"] * 3, {"content-length": str(5 << 20)})
    with pytest.raises(HttpError) as info:
        asyncio.run(read_json(req, limit=4 << 20))
    assert info.value.status == 413 and info.value.headers["Connection"] == "close"
    assert len(req.state.pending) == 3


def test_a_streamed_body_is_413_once_past_the_limit_and_no_further() -> None:
    req = request([b" " * 1024] * 10, {})
    with pytest.raises(HttpError) as info:
        asyncio.run(read_json(req, limit=4096))
    assert info.value.status == 413
    assert len(req.state.pending) == 5  # four chunks fit; the fifth passed the limit


def test_a_body_within_the_limit_is_parsed() -> None:
    assert asyncio.run(read_json(request([b'{"n"', b": 2}"], {}), limit=4096)) == {"n": 2}
