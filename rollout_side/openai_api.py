"""An OpenAI-compatible HTTP face of a rollout, over the same Generation core (and gate) as Generate.

`serve --http-port P` starts it beside the gRPC server. Endpoints: GET /v1/models, POST /v1/completions
(prompt as text or token ids, one or a list), POST /v1/chat/completions (the tokenizer's chat template),
both streamed (server-sent events) or not, with logprobs, n, stop and vLLM's extra sampling fields
(seed, stop_token_ids, ignore_eos); GET /ready (503 until a version is committed, for HTTP readiness
probes) and GET /health (liveness).

What the rollout adds to the OpenAI shapes: every response carries `weight_version` (top-level integer)
and an `x-weight-version` header; every choice its `token_ids` (and `token_weight_versions` when the swap
policy continue made it span versions); requests may carry `min_weight_version` and `wait_for_version`.
Before the first commit every generation endpoint answers 503 with an OpenAI-style error body
({"error": {"message", "type", "param", "code"}}, code = the weightsync Reason) and `Retry-After`.
When the rollout has a Generate token (--generate-token-file) every /v1 endpoint wants it as
`Authorization: Bearer <token>`, which is how the `openai` client sends its api_key.

Built on starlette and uvicorn (both come with vLLM); the same code serves both engines.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, cast

import grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rollout_side.auth import ServerSecurity
from rollout_side.engines.base import Completion
from rollout_side.generation import Generation, GenerationRequest
from weightsync.errors import WeightSyncError

__all__ = ["HttpServer", "create_app", "start_http"]

logger = logging.getLogger(__name__)

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
    409: "conflict_error",
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


class OpenAIFace:
    """The endpoints, over one Generation core; `model` is the id /v1/models lists (any id is accepted)."""

    def __init__(
        self, generation: Generation, *, model: str, generate_token: str | None = None, vllm_serving: bool = True
    ) -> None:
        self.generation = generation
        self.engine = generation.engine
        self.model = model
        self._token = generate_token.encode() if generate_token else None
        self._tokenizer: Any = None
        self._vllm: Any = None  # VllmOpenAI on the vLLM engine: vLLM's own serving layer answers
        self._vllm_serving = self.engine.name == "vllm" and vllm_serving

    async def _through_vllm(self, request: Request, body: dict[str, Any], *, chat: bool) -> Response | None:
        """On the vLLM engine, answers through vLLM's OpenAI serving layer behind the rollout's gate."""
        if not self._vllm_serving:
            return None
        await self.generation.gate.admit(
            _int(body, "min_weight_version", 0) or 0, wait=bool(body.get("wait_for_version")), timeout=None
        )
        if self._vllm is None:
            from rollout_side.vllm_openai import VllmOpenAI

            self._vllm = VllmOpenAI(self.engine, self.model)  # type: ignore[arg-type]
        serve = self._vllm.chat_completions if chat else self._vllm.completions
        response: Response = await serve(body, request, self.engine.weight_version)
        return response

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.engine.model_dir)
        return self._tokenizer

    # -- endpoints --------------------------------------------------------------------------------

    async def ready(self, request: Request) -> Response:
        version = self.engine.weight_version
        if version == 0:
            return HttpError(
                503, "no weights are committed yet", "NO_WEIGHTS", {"Retry-After": str(RETRY_AFTER_SECONDS)}
            ).response()
        return self._json({"status": "ready"}, version)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "alive", "weight_version": self.engine.weight_version})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        card = {"id": self.model, "object": "model", "created": 0, "owned_by": "weightsync", "root": self.model}
        return self._json({"object": "list", "data": [card]}, self.engine.weight_version)

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await _body(request)
        if (answer := await self._through_vllm(request, body, chat=False)) is not None:
            return answer
        prompts = _prompts(body.get("prompt"))
        if body.get("echo") or body.get("suffix") or body.get("best_of", 1) not in (1, None):
            raise bad("echo, suffix and best_of are not supported")
        logprobs = _int(body, "logprobs", None)
        base = self._request(body, logprobs=logprobs is not None, top_logprobs=logprobs or 0)
        requests = [_with_prompt(base, prompt) for prompt in prompts]
        if body.get("stream"):
            return await self._stream(request, requests, body, chat=False)
        groups = await self._run(request, requests)
        choices, version = [], 0
        for p, outs in enumerate(groups):
            for i, out in enumerate(outs):
                choice = {
                    "index": p * len(outs) + i,
                    "text": out.text,
                    "logprobs": self._completion_logprobs(out) if logprobs is not None else None,
                    "finish_reason": out.finish_reason,
                }
                choices.append(choice | _extras(out))
                version = version or out.weight_version
        usage = _usage(requests, groups, self)
        result = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        return self._json(result | {"model": self.model, "choices": choices, "usage": usage}, version)

    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await _body(request)
        if (answer := await self._through_vllm(request, body, chat=True)) is not None:
            return answer
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise bad("messages must be a non-empty list of objects")
        messages = [_flat_content(message) for message in messages]
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=body.get("add_generation_prompt", True), tokenize=True
            )
        except Exception as error:  # noqa: BLE001 - jinja and tokenizer errors alike: the request's fault
            raise bad(f"the chat template cannot render these messages: {error}") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        top = _int(body, "top_logprobs", 0) or 0
        base = self._request(
            body,
            logprobs=bool(body.get("logprobs")),
            top_logprobs=top if body.get("logprobs") else 0,
            max_tokens_field=("max_completion_tokens", "max_tokens"),
        )
        requests = [_with_prompt(base, [int(i) for i in ids])]
        if body.get("stream"):
            return await self._stream(request, requests, body, chat=True)
        [outs] = await self._run(request, requests)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": {"content": self._chat_logprobs(out)} if base.logprobs else None,
                "finish_reason": out.finish_reason,
            }
            | _extras(out)
            for i, out in enumerate(outs)
        ]
        usage = _usage(requests, [outs], self)
        result = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time())}
        return self._json(result | {"model": self.model, "choices": choices, "usage": usage}, outs[0].weight_version)

    # -- requests ---------------------------------------------------------------------------------

    def _request(
        self,
        body: dict[str, Any],
        *,
        logprobs: bool,
        top_logprobs: int,
        max_tokens_field: Sequence[str] = ("max_tokens",),
    ) -> GenerationRequest:
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
        return GenerationRequest(
            # Chat answers may use the whole context by default, as vLLM's do; completions default to 16.
            max_tokens=max_tokens or (self.generation.max_tokens_limit if chat else 16),
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            min_weight_version=_int(body, "min_weight_version", 0) or 0,
            wait_for_version=bool(body.get("wait_for_version", False)),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            n=_int(body, "n", 1) or 1,
            stop=stop,
            stop_token_ids=[int(t) for t in body.get("stop_token_ids") or []],
            ignore_eos=bool(body.get("ignore_eos", False)),
        )

    async def _run(self, request: Request, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """Runs every prompt's completions; a client that disconnects cancels them (the engines abort)."""
        work = asyncio.ensure_future(asyncio.gather(*(self.generation.generate_n(r) for r in requests)))
        try:
            while True:
                done, _ = await asyncio.wait({work}, timeout=0.5)
                if done:
                    return list(work.result())
                if await request.is_disconnected():
                    work.cancel()
                    raise HttpError(499, "client disconnected", "CANCELLED")
        except WeightSyncError as error:
            raise HttpError.of(error) from None
        finally:
            work.cancel()

    async def _stream(
        self, request: Request, requests: list[GenerationRequest], body: dict[str, Any], *, chat: bool
    ) -> Response:
        """Server-sent events; admission (and its errors) happens before the first byte is sent."""
        n = requests[0].n or 1
        streams = [cast(AsyncGenerator[tuple[int, Completion]], self.generation.generate_stream_n(r)) for r in requests]
        merged = _merge(streams, n)
        try:
            first = await anext(merged)
        except WeightSyncError as error:
            await merged.aclose()
            raise HttpError.of(error) from None
        except StopAsyncIteration:
            raise HttpError(500, "the engine produced nothing", "INTERNAL") from None
        version = first[1].weight_version
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        stream_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        events = self._events(merged, first, requests, stream_id=stream_id, chat=chat, include_usage=include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"x-weight-version": str(version)})

    async def _events(
        self,
        merged: AsyncGenerator[tuple[int, Completion]],
        first: tuple[int, Completion],
        requests: list[GenerationRequest],
        *,
        stream_id: str,
        chat: bool,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        base = {"id": stream_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created}
        base["model"] = self.model
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
                ids = tokens.setdefault(index, [])
                ids += piece.token_ids
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
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
                    choice["logprobs"] = {"content": self._chat_logprobs(piece)} if want_logprobs else None
                else:
                    choice["text"] = delta
                    choice["logprobs"] = self._completion_logprobs(piece) if want_logprobs else None
                choice["token_ids"] = piece.token_ids
                if delta or piece.token_ids or piece.finish_reason:
                    yield _sse(base | {"choices": [choice], "weight_version": piece.weight_version})
                pending = await anext(merged, None)
            if include_usage:
                prompt_tokens = sum(self._prompt_tokens(r) for r in requests)
                completion_tokens = sum(len(t) for t in tokens.values())
                usage = _usage_numbers(prompt_tokens, completion_tokens)
                yield _sse(base | {"choices": [], "usage": usage, "weight_version": first[1].weight_version})
            yield "data: [DONE]\n\n"
        except WeightSyncError as error:
            http = HttpError.of(error)  # the status line is sent: the error goes in the stream, as vLLM does
            yield _sse({"error": {"message": http.message, "type": ERROR_TYPE.get(http.status), "code": http.code}})
        finally:
            await merged.aclose()  # a client gone early: the engines abort its requests

    # -- shapes -----------------------------------------------------------------------------------

    def _prompt_tokens(self, request: GenerationRequest) -> int:
        return len(request.prompt_token_ids) or len(self.tokenizer.encode(request.prompt, add_special_tokens=False))

    def _token_text(self, token: int) -> str:
        return str(self.tokenizer.decode([token]))

    def _completion_logprobs(self, out: Completion) -> dict[str, Any]:
        texts = [self._token_text(t) for t in out.token_ids]
        offsets, at = [], 0
        for text in texts:
            offsets.append(at)
            at += len(text)
        top = [{self._token_text(t): lp for t, lp in alt.items()} for alt in out.top_logprobs or []]
        return {
            "tokens": texts,
            "token_logprobs": list(out.logprobs or []),
            "top_logprobs": top or None,
            "text_offset": offsets,
        }

    def _chat_logprobs(self, out: Completion) -> list[dict[str, Any]]:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self._token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        tops = out.top_logprobs or [{} for _ in out.token_ids]
        return [
            entry(t, lp) | {"top_logprobs": [entry(a, alp) for a, alp in alt.items()]}
            for t, lp, alt in zip(out.token_ids, out.logprobs or [], tops, strict=False)
        ]

    def _json(self, payload: dict[str, Any], version: int) -> JSONResponse:
        return JSONResponse(payload | {"weight_version": version}, headers={"x-weight-version": str(version)})

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise HttpError(401, "authentication required", "UNAUTHENTICATED")
        if not hmac.compare_digest(presented.encode(), self._token):
            raise HttpError(403, "permission denied", "PERMISSION_DENIED")


def create_app(
    generation: Generation, *, model: str, generate_token: str | None = None, vllm_serving: bool = True
) -> Starlette:
    """The app; `vllm_serving` False makes the vLLM engine answer through the rollout's own code too."""
    face = OpenAIFace(generation, model=model, generate_token=generate_token, vllm_serving=vllm_serving)

    def handle(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            try:
                return await endpoint(request)
            except HttpError as error:
                return error.response()
            except WeightSyncError as error:
                return HttpError.of(error).response()
            except Exception:
                logger.exception("HTTP %s failed", request.url.path)
                return HttpError(500, "internal error; see the rollout's log", "INTERNAL").response()

        return handler

    routes = [
        Route("/v1/models", handle(face.models), methods=["GET"]),
        Route("/v1/completions", handle(face.completions), methods=["POST"]),
        Route("/v1/chat/completions", handle(face.chat_completions), methods=["POST"]),
        Route("/ready", handle(face.ready), methods=["GET"]),
        Route("/health", handle(face.health), methods=["GET"]),
    ]
    return Starlette(routes=routes)


class HttpServer:
    """A uvicorn server running on the current event loop, on a socket bound beforehand."""

    def __init__(self, server: Any, sock: socket.socket) -> None:
        self._server = server
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        await self._server.main_loop()
        await self._server.shutdown(sockets=[self._sock])

    async def stop(self) -> None:
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, 10)
        except (TimeoutError, asyncio.CancelledError):
            logger.warning("the HTTP server did not stop within 10 s")
        finally:
            self._sock.close()


async def start_http(
    generation: Generation,
    *,
    host: str,
    port: int,
    model: str,
    security: ServerSecurity | None = None,
    vllm_serving: bool = True,
) -> HttpServer:
    """Serves the OpenAI-compatible API on host:port (0: any free port) until `stop()`; OSError if it cannot bind."""
    import uvicorn

    token = security.generate_token if security else None
    app = create_app(generation, model=model, generate_token=token, vllm_serving=vllm_serving)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))  # here, so that a busy port is an OSError, not uvicorn's sys.exit
    except OSError:
        sock.close()
        raise
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    config.load()
    server = uvicorn.Server(config)
    # startup/main_loop/shutdown, not serve(): serve() takes the process's signals, which the rollout owns.
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    return HttpServer(server, sock)


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise bad("the body is not JSON") from None
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    return body


def _prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt: a string, a list of token ids, or a list of either."""
    if isinstance(prompt, str) and prompt:
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) and p for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise bad("prompt must be a non-empty string, a list of token ids, or a list of either")


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


def _extras(out: Completion) -> dict[str, Any]:
    extra: dict[str, Any] = {"token_ids": out.token_ids}
    if out.token_versions:
        extra["token_weight_versions"] = out.token_versions
    return extra


def _usage_numbers(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def _usage(requests: list[GenerationRequest], groups: list[list[Completion]], face: OpenAIFace) -> dict[str, int]:
    prompt_tokens = sum(face._prompt_tokens(r) for r in requests)
    return _usage_numbers(prompt_tokens, sum(len(out.token_ids) for outs in groups for out in outs))


def _cut(text: str, stops: list[str]) -> str:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(hits)] if hits else text


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _merge(
    streams: list[AsyncGenerator[tuple[int, Completion]]], n: int
) -> AsyncGenerator[tuple[int, Completion]]:
    """Several prompts' streams as one; prompt p's completion i becomes choice p * n + i."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, Completion] | BaseException | None] = asyncio.Queue()

    async def pump(p: int, stream: AsyncGenerator[tuple[int, Completion]]) -> None:
        try:
            async for i, piece in stream:
                queue.put_nowait((p * n + i, piece))
        except Exception as error:  # noqa: BLE001 - re-raised by the reader
            queue.put_nowait(error)
        else:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(p, s)) for p, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            got = await queue.get()
            if got is None:
                running -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield got
    finally:
        for task in tasks:
            task.cancel()
