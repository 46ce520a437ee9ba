"""Limits before work on the OpenAI HTTP face: what a request may cost is decided before it costs it.

The order, cheapest first (docs/security.md lists it): the body's declared size (Content-Length) before
a byte of it is read, its streamed size while it is read, JSON parsing (off the event loop when large,
nesting bounded), every field this face reads by type and range, the number of choices (prompts x n) and
of chat messages and characters, then the model name. Templating, tokenizing and generation come only
after (openai_api.py), on both engines: vLLM's own serving layer gets only a request that passed here.

The field tables (`COMPLETION_FIELDS`, `CHAT_FIELDS`) map a field to its check: a field the face
learns to read gets its entry there.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from starlette.requests import Request

from rollout_side.serving.generation import MAX_N, MAX_TEMPERATURE, MAX_TOP_LOGPROBS, PROMPT_CHARS_PER_TOKEN
from rollout_side.serving.openai_schema import HttpError, bad
from weightsync.limits import GENERATE_REQUEST_BYTES, MAX_VERSION, PARSE_INLINE_BYTES

__all__ = [
    "BODY_SECONDS",
    "CHAT_FIELDS",
    "COMPLETION_FIELDS",
    "MAX_CHOICES",
    "MAX_JSON_DEPTH",
    "MAX_STOP_STRINGS",
    "check_chat",
    "check_completion",
    "check_model",
    "check_weight_checker",
    "parse_json",
    "read_json",
]

# A body, like a gRPC GenerateRequest, is at most GENERATE_REQUEST_BYTES; it must arrive within this.
BODY_SECONDS = 60.0
# Choices per request: gRPC Generate's n <= 64 holds for prompts x n, the work one request can ask for.
MAX_CHOICES = MAX_N
# Tool schemas nest a dozen levels; deeper is an attack on whatever walks the request recursively.
MAX_JSON_DEPTH = 64
MAX_STOP_STRINGS = 64
INT64 = (-(1 << 63), (1 << 63) - 1)  # seeds, as vLLM bounds them
INT32_MAX = (1 << 31) - 1  # top_k is int32 on the wire
MAX_REPETITION_PENALTY = 100.0  # vLLM takes any positive value; past a few it only forbids repeating

Check = Callable[[str, Any], None]


# -- the body ---------------------------------------------------------------------------------------


async def read_json(request: Request, limit: int = GENERATE_REQUEST_BYTES) -> dict[str, Any]:
    """The body as a JSON object, refused (413) unread when it says or turns out to be over `limit` bytes."""
    return await parse_json(await _read(request, limit))


async def _read(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad("Content-Length is not a number")
        if int(declared) > limit:
            raise _too_large(f"the body is {declared} bytes", limit)
    body = bytearray()

    async def receive() -> None:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise _too_large("the body is longer", limit)
            body.extend(chunk)

    try:
        await asyncio.wait_for(receive(), BODY_SECONDS)
    except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11 on, two on 3.10
        raise HttpError(408, f"the body did not arrive within {BODY_SECONDS:g} s", "TIMEOUT", dict(_CLOSE)) from None
    return bytes(body)


async def parse_json(data: bytes) -> dict[str, Any]:
    """`data` as a JSON object (400 if it is not one, or nests deeper than MAX_JSON_DEPTH); large bodies
    are parsed on a thread, so the event loop (which gRPC shares) goes on answering."""

    def parse() -> dict[str, Any]:
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: nested past the interpreter's limit
            raise bad("the body is not JSON, or nests too deeply") from None
        if not isinstance(body, dict):
            raise bad("the body must be a JSON object")
        _check_depth(body)
        return body

    return parse() if len(data) <= PARSE_INLINE_BYTES else await asyncio.to_thread(parse)


def _check_depth(value: Any) -> None:
    """Refuses JSON nested deeper than MAX_JSON_DEPTH, without recursing itself."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


_CLOSE = {"Connection": "close"}  # the rest of a refused body is not read: this connection cannot go on


def _too_large(what: str, limit: int) -> HttpError:
    return HttpError(413, f"{what}: over this rollout's limit of {limit} bytes", "TOO_LARGE", dict(_CLOSE))


# -- fields by type and range -----------------------------------------------------------------------


def integer(low: int, high: int) -> Check:
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"{name} must be an integer")
        if not low <= value <= high:
            raise bad(f"{name} must be within [{low}, {high}]")

    return check


def number(low: float, high: float) -> Check:
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"{name} must be a number")
        if not math.isfinite(value) or not low <= value <= high:
            raise bad(f"{name} must be within [{low:g}, {high:g}]")

    return check


def boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false")


def string(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise bad(f"{name} must be a string")


def stop_strings(name: str, value: Any) -> None:
    """OpenAI's stop: a string or a list of strings."""
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad(f"{name} must be a string or a list of strings")
    if len(value) > MAX_STOP_STRINGS:
        raise bad(f"{name} holds {len(value)} strings; at most {MAX_STOP_STRINGS}")


def token_ids(name: str, value: Any) -> None:
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < (1 << 31) for t in value
    ):
        raise bad(f"{name} must be a list of token ids (integers from 0)")


def stream_options(name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise bad(f"{name} must be an object")
    if value.get("include_usage") is not None:
        boolean(f"{name}.include_usage", value["include_usage"])


# Every field the face reads, on both routes; a missing or null field takes its default.
COMMON_FIELDS: dict[str, Check] = {
    "model": string,
    "n": integer(1, MAX_N),
    "max_tokens": integer(1, INT64[1]),
    "temperature": number(0.0, MAX_TEMPERATURE),
    "top_p": number(0.0, 1.0),
    "seed": integer(*INT64),
    "stop": stop_strings,
    "stop_token_ids": token_ids,
    "ignore_eos": boolean,
    "stream": boolean,
    "stream_options": stream_options,
    "min_weight_version": integer(0, MAX_VERSION),
    "wait_for_version": boolean,
    # vLLM's sampling extras and RL conventions (TRL's VLLMClient sends them).
    "top_k": integer(-1, INT32_MAX),
    "min_p": number(0.0, 1.0),
    "repetition_penalty": number(0.0, MAX_REPETITION_PENALTY),
    "return_token_ids": boolean,
    "return_tokens_as_token_ids": boolean,
    "return_weight_versions": boolean,
}
COMPLETION_FIELDS: dict[str, Check] = COMMON_FIELDS | {
    "logprobs": integer(0, MAX_TOP_LOGPROBS),
    "echo": boolean,
}
CHAT_FIELDS: dict[str, Check] = COMMON_FIELDS | {
    "logprobs": boolean,
    "top_logprobs": integer(0, MAX_TOP_LOGPROBS),
    "max_completion_tokens": integer(1, INT64[1]),
    "add_generation_prompt": boolean,
}


def check_fields(body: Mapping[str, Any], fields: Mapping[str, Check]) -> None:
    """Refuses (400, naming the field) a field of the wrong type or out of range."""
    for name, check in fields.items():
        value = body.get(name)
        if value is not None:
            check(name, value)


# -- what a request asks for ------------------------------------------------------------------------


def check_choices(prompts: int, body: Mapping[str, Any]) -> None:
    """Refuses more than MAX_CHOICES completions in one request: prompts x n (n already checked)."""
    n = body.get("n") or 1
    if prompts * n > MAX_CHOICES:
        raise bad(f"{prompts} prompts x n {n} = {prompts * n} completions; this rollout's limit is {MAX_CHOICES}")


def prompt_count(prompt: Any) -> int:
    """How many prompts OpenAI's `prompt` holds (a string or token ids is one; a list of either, many)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def check_completion(body: Mapping[str, Any]) -> None:
    """A /v1/completions body's fields and its number of completions."""
    check_fields(body, COMPLETION_FIELDS)
    check_choices(prompt_count(body.get("prompt")), body)


def check_chat(body: Mapping[str, Any], max_model_len: int) -> None:
    """A /v1/chat/completions body's fields, then its messages by count and characters: what no template
    can fit in the model's length is refused before a template renders it."""
    check_fields(body, CHAT_FIELDS)
    check_choices(1, body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise bad("messages must be a non-empty list of objects")
    if len(messages) > max_model_len:
        raise bad(f"{len(messages)} messages cannot fit this model's length of {max_model_len} tokens")
    characters = sum(_characters(message.get("content")) for message in messages)
    if characters > max_model_len * PROMPT_CHARS_PER_TOKEN:
        raise bad(
            f"the messages hold {characters} characters: more than this model's length of {max_model_len} "
            f"tokens can hold ({PROMPT_CHARS_PER_TOKEN} characters per token at most)"
        )


def _characters(content: Any) -> int:
    """A message content's text: a string, or a list of parts with text."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def check_model(body: Mapping[str, Any], served: str) -> None:
    """404 for a model this rollout does not serve, as vLLM answers; no model at all means the served one."""
    model = body.get("model")
    if model and model != served:
        raise HttpError(404, f"The model {json.dumps(model[:256])} does not exist.", "NOT_FOUND")


# vLLM's /weight_checker actions a rollout answers (weight_checker.py); its "reset" zeroes every weight.
WEIGHT_CHECKER_ACTIONS = ("checksum", "compare")


def check_weight_checker(body: Mapping[str, Any]) -> str:
    """A /weight_checker body as vLLM's RL server takes it (`action`, and `baseline` for compare): its action."""
    action = body.get("action")
    if action == "reset":
        raise bad("action 'reset' (zero every weight) is not offered: a rollout serves only weights it can vouch for")
    if action not in WEIGHT_CHECKER_ACTIONS:
        raise bad("action must be 'checksum' or 'compare'")
    baseline = body.get("baseline")
    if baseline is not None and (
        not isinstance(baseline, dict) or not all(isinstance(digest, str) for digest in baseline.values())
    ):
        raise bad("baseline must be an object of tensor names to checksums (strings)")
    if action == "compare" and baseline is None:
        raise bad("action 'compare' requires a 'baseline' object")
    return str(action)
