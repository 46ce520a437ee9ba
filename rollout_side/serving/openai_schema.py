"""The OpenAI wire shapes, kept apart from the routes (rollout_side/serving/openai_api.py) so they read and test
without a server: request bodies parsed and checked, responses and errors shaped.

Parsing turns a /v1/completions or /v1/chat/completions body into GenerationRequests (prompt as text or
token ids, one or a list; the sampling fields and vLLM's extras), refusing a malformed one with a 400
before any work. Shaping builds the choices' extras (`token_ids`; vLLM's conventions `prompt_token_ids`
with return_token_ids, `weight_versions` spans with return_weight_versions, "token_id:<id>" tokens with
return_tokens_as_token_ids; `token_weight_versions`, the older alias of the spans), logprobs in
the completions and chat forms, usage, server-sent events, and the OpenAI-style error body
({"error": {"message", "type", "param", "code"}}) a WeightSyncError maps to (Google's gRPC-to-HTTP
status mapping, `Retry-After` on a 503).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from starlette.responses import JSONResponse

from rollout_side.engines.base import Completion
from rollout_side.serving.generation import GenerationRequest
from weightsync.errors import WeightSyncError
from weightsync.spans import version_spans

__all__ = ["ERROR_TYPE", "HTTP_STATUS", "RETRY_AFTER_SECONDS", "Conventions", "HttpError", "bad", "weight_versions"]

RETRY_AFTER_SECONDS = 5
# Google's mapping of gRPC codes to HTTP statuses (google.rpc.Code), for errors the core raises.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class HttpError(Exception):
    """An answer other than 200, as an OpenAI-style error body."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": ERROR_TYPE.get(self.status, "server_error"), "param": None}
        return JSONResponse({"error": error | {"code": self.code}}, self.status, headers=self.headers)

    @classmethod
    def of(cls, error: WeightSyncError) -> HttpError:
        status = HTTP_STATUS.get(error.code, 500)
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
        return cls(status, str(error), error.reason.value, headers)


def bad(message: str) -> HttpError:
    return HttpError(400, message, "BAD_REQUEST")


@dataclass(frozen=True, kw_only=True, slots=True)
class Conventions:
    """vLLM's per-request output switches (what TRL's VLLMClient asks for), read from a request body."""

    token_ids: bool = False  # return_token_ids: prompt_token_ids too (choices carry token_ids always)
    tokens_as_ids: bool = False  # return_tokens_as_token_ids: logprobs' tokens as "token_id:<id>"
    weight_versions: bool = False  # return_weight_versions: each choice's [{"version", "start", "end"}]

    @classmethod
    def of(cls, body: dict[str, Any]) -> Conventions:
        return cls(
            token_ids=bool(body.get("return_token_ids")),
            tokens_as_ids=bool(body.get("return_tokens_as_token_ids")),
            weight_versions=bool(body.get("return_weight_versions")),
        )


def weight_versions(versions: Sequence[int], offset: int = 0) -> list[dict[str, int]]:
    """vLLM 0.33's `weight_versions` of a choice: spans [start, end) of its tokens, one per version."""
    return [span.json() for span in version_spans(versions, offset)]


# -- requests ---------------------------------------------------------------------------------------


def _prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt: a string, a list of token ids, or a list of either (their count checked before)."""
    if isinstance(prompt, str) and prompt:
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if _token_ids(prompt):
            return [list(prompt)]
        if all(isinstance(p, str) and p for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and _token_ids(p) for p in prompt):
            return [list(p) for p in prompt]
    raise bad("prompt must be a non-empty string, a list of token ids, or a list of either")


def _token_ids(values: list[Any]) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in values)


def _flat_content(message: dict[str, Any]) -> dict[str, Any]:
    """A message whose content is a list of parts, as one string (the text parts, joined)."""
    content = message.get("content")
    if isinstance(content, list):
        texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        return message | {"content": "".join(texts)}
    return message | {"content": content or ""}


def _with_prompt(request: GenerationRequest, prompt: str | list[int]) -> GenerationRequest:
    import dataclasses

    if isinstance(prompt, str):
        return dataclasses.replace(request, prompt=prompt)
    return dataclasses.replace(request, prompt_token_ids=prompt)


def _int(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer")
    return value


def _float(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"{name} must be a number")
    return float(value)


def _request(
    body: dict[str, Any],
    max_tokens_limit: int,
    *,
    logprobs: bool,
    top_logprobs: int,
    max_tokens_field: Sequence[str] = ("max_tokens",),
) -> GenerationRequest:
    """The sampling fields of a completions or chat body; the chat's default max_tokens is `max_tokens_limit`."""
    chat = "max_completion_tokens" in max_tokens_field
    max_tokens = next((_int(body, f, None) for f in max_tokens_field if body.get(f) is not None), None)
    if max_tokens is not None and max_tokens < 1:
        raise bad("max_tokens must be at least 1")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("stop must be a string or a list of strings")
    temperature = _float(body, "temperature", 1.0)  # the OpenAI API's default
    top_p = _float(body, "top_p", 1.0)
    seed = _int(body, "seed", None)
    top_k = _int(body, "top_k", 0) or 0
    return GenerationRequest(
        # Chat answers may use the whole context by default, as vLLM's do; completions default to 16.
        max_tokens=max_tokens or (max_tokens_limit if chat else 16),
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        min_weight_version=_int(body, "min_weight_version", 0) or 0,
        wait_for_version=bool(body.get("wait_for_version", False)),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        n=_int(body, "n", 1) or 1,  # 0 and below were refused by openai_limits.py
        stop=stop,
        stop_token_ids=[int(t) for t in body.get("stop_token_ids") or []],
        ignore_eos=bool(body.get("ignore_eos", False)),
        top_k=top_k,
        min_p=_float(body, "min_p", 0.0),
        repetition_penalty=_float(body, "repetition_penalty", 1.0),
    )


# -- responses --------------------------------------------------------------------------------------


def _cut(text: str, stops: list[str]) -> str:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(hits)] if hits else text


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _extras(out: Completion, conventions: Conventions, prompt_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """A choice's rollout fields: its own version (a multi-prompt request's prompts may run on different
    versions), its token ids, and per-token versions when the swap policy continue made it span two;
    `prompt_ids` (a completions choice's prompt) with return_token_ids, version spans if asked for."""
    extra: dict[str, Any] = {"weight_version": out.weight_version, "token_ids": out.token_ids}
    if conventions.token_ids and prompt_ids is not None:
        extra["prompt_token_ids"] = list(prompt_ids)
    if conventions.weight_versions:
        extra["weight_versions"] = weight_versions(out.token_versions or [out.weight_version] * len(out.token_ids))
        extra |= lineage(out)
    if out.token_versions:
        extra["token_weight_versions"] = out.token_versions
    return extra


def lineage(out: Completion) -> dict[str, Any]:
    """With return_weight_versions: what `weight_version` is (a LoRA adapter version and its base, or a full
    version: adapter_version 0), as Generate's replies say it."""
    return {"base_fingerprint": out.base_fingerprint, "adapter_version": out.adapter_version}


def _usage_numbers(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def _completion_logprobs(out: Completion, token_text: Callable[[int], str]) -> dict[str, Any]:
    texts = [token_text(t) for t in out.token_ids]
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    # As vLLM's: per token, the sampled token's logprob and the k best alternatives' (k = 0 included).
    alternatives = out.top_logprobs or [{} for _ in out.token_ids]
    top = [
        {text: lp} | {token_text(t): alp for t, alp in alt.items()}
        for text, lp, alt in zip(texts, out.logprobs or [], alternatives, strict=False)
    ]
    return {
        "tokens": texts,
        "token_logprobs": list(out.logprobs or []),
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _chat_logprobs(out: Completion, token_text: Callable[[int], str]) -> list[dict[str, Any]]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    tops = out.top_logprobs or [{} for _ in out.token_ids]
    return [
        entry(t, lp) | {"top_logprobs": [entry(a, alp) for a, alp in alt.items()]}
        for t, lp, alt in zip(out.token_ids, out.logprobs or [], tops, strict=False)
    ]


async def _events(
    merged: AsyncGenerator[tuple[int, Completion]],
    first: tuple[int, Completion],
    requests: list[GenerationRequest],
    *,
    model: str,
    decode: Callable[[list[int]], str],
    token_text: Callable[[int], str],
    count_prompt_tokens: Callable[[], Awaitable[int]],
    stream_id: str,
    chat: bool,
    include_usage: bool,
    conventions: Conventions,
    prompt_ids_of: Callable[[int], list[int]],
) -> AsyncIterator[str]:
    """The server-sent events of merged streams, from the `first` piece; stop strings are held back until cut.

    As vLLM's with return_token_ids, a choice's first chunk carries its `prompt_token_ids` (of choice index
    i: `prompt_ids_of(i)`); a chunk's `weight_versions` spans count tokens from the choice's first.
    """
    created = int(time.time())
    base = {"id": stream_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created}
    base["model"] = model
    stops = list(requests[0].stop)
    holdback = max((len(s) for s in stops), default=1) - 1
    tokens: dict[int, list[int]] = {}
    sent: dict[int, str] = {}
    want_logprobs = requests[0].logprobs or requests[0].top_logprobs > 0
    try:
        pending: tuple[int, Completion] | None = first
        while pending is not None:
            index, piece = pending
            if chat and index not in sent:
                role = {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield _sse(base | {"choices": [role], "weight_version": piece.weight_version})
            first_of_choice = index not in tokens
            ids = tokens.setdefault(index, [])
            offset = len(ids)
            ids += piece.token_ids
            text = decode(ids)
            if piece.finish_reason:
                text = _cut(text, stops)
            elif text.endswith("\ufffd"):  # an incomplete character: wait for the next token
                text = sent.get(index, "")
            else:
                text = text[: len(text) - holdback] if stops and holdback else text
            done = sent.get(index, "")
            delta = text[len(done) :] if text.startswith(done) else ""
            sent[index] = done + delta
            choice: dict[str, Any] = {"index": index, "finish_reason": piece.finish_reason or None}
            if chat:
                choice["delta"] = {"content": delta} if delta or not piece.finish_reason else {}
                choice["logprobs"] = {"content": _chat_logprobs(piece, token_text)} if want_logprobs else None
            else:
                choice["text"] = delta
                choice["logprobs"] = _completion_logprobs(piece, token_text) if want_logprobs else None
            choice["token_ids"] = piece.token_ids
            choice["weight_version"] = piece.weight_version
            if conventions.token_ids and first_of_choice:
                choice["prompt_token_ids"] = prompt_ids_of(index)
            if conventions.weight_versions:
                choice["weight_versions"] = weight_versions([piece.weight_version] * len(piece.token_ids), offset)
                choice |= lineage(piece)
            if delta or piece.token_ids or piece.finish_reason:
                yield _sse(base | {"choices": [choice], "weight_version": piece.weight_version})
            pending = await anext(merged, None)
        if include_usage:
            prompt_tokens = await count_prompt_tokens()
            completion_tokens = sum(len(t) for t in tokens.values())
            usage = _usage_numbers(prompt_tokens, completion_tokens)
            yield _sse(base | {"choices": [], "usage": usage, "weight_version": first[1].weight_version})
        yield "data: [DONE]\n\n"
    except WeightSyncError as error:
        http = HttpError.of(error)  # the status line is sent: the error goes in the stream, as vLLM does
        yield _sse({"error": {"message": http.message, "type": ERROR_TYPE.get(http.status), "code": http.code}})
    finally:
        await merged.aclose()  # a client gone early: the engines abort its requests
