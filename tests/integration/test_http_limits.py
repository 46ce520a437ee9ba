"""The OpenAI HTTP face as hard as gRPC: auth on every route, limits before work, 400s never 500s.

Real rollout processes (`python -m rollout_side serve --http-port`) over real sockets: the torch engine
for everything, the vLLM engine for the auth matrix and the limits before vLLM's own serving layer.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest

from rollout_side.process import RolloutProcess, free_port
from rollout_side.serving.openai_api import HEADER_SECONDS
from rollout_side.serving.openai_limits import MAX_CHOICES
from weightsync.limits import GENERATE_REQUEST_BYTES
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

TOKEN = "http-limits-token"
MIB = 1 << 20
COMPLETION = {"model": "M", "prompt": "the cat", "max_tokens": 2}
CHAT = {"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
CHECKER = {"action": "checksum"}
# Every /v1 route, streamed and not (GET /v1/models has no stream), and vLLM's /weight_checker.
ROUTES = [
    ("POST", "/v1/completions", COMPLETION, False),
    ("POST", "/v1/completions", COMPLETION, True),
    ("POST", "/v1/chat/completions", CHAT, False),
    ("POST", "/v1/chat/completions", CHAT, True),
    ("GET", "/v1/models", None, False),
    ("POST", "/weight_checker", CHECKER, False),
]
ROUTE_IDS = ["completions", "completions-stream", "chat", "chat-stream", "models", "weight-checker"]


class HttpRollout:
    """A rollout process with its HTTP face, its log, and its model's served name."""

    def __init__(self, process: RolloutProcess, http_port: int, model: str, log: Path) -> None:
        self.process, self.model, self.log = process, model, log
        self.base = f"http://127.0.0.1:{http_port}"
        self.http_port = http_port

    def body(self, template: dict[str, Any] | None, **extra: Any) -> dict[str, Any] | None:
        return None if template is None else template | {"model": self.model} | extra

    def send(self, method: str, path: str, body: Any = None, token: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, self.base + path, json=body, headers=headers, timeout=60)

    def traceback_free(self) -> None:
        log = self.log.read_text(errors="replace")
        assert "Traceback" not in log and "internal error" not in log, log[-4000:]


def start(model_dir: Path, tmp: Path, *, engine: str = "torch", args: Sequence[str] = ()) -> HttpRollout:
    http_port = free_port()
    log = tmp / "rollout.log"
    process = RolloutProcess(model_dir, engine=engine, args=["--http-port", str(http_port), *args], log=log)
    rollout = HttpRollout(process, http_port, str(model_dir), log)
    deadline = time.monotonic() + 120
    while True:  # the HTTP face starts after gRPC listens
        try:
            httpx.get(rollout.base + "/health", timeout=5)
            return rollout
        except httpx.TransportError:
            if time.monotonic() > deadline:
                process.stop()
                raise
            time.sleep(0.1)


def token_args(tmp: Path) -> list[str]:
    token_file = tmp / "generate-token"
    token_file.write_text(TOKEN)
    return ["--generate-token-file", str(token_file)]


@pytest.fixture(scope="module")
def gated(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpRollout]:
    """A torch rollout with a Generate token and nothing committed."""
    tmp = tmp_path_factory.mktemp("gated")
    rollout = start(model_dir, tmp, args=token_args(tmp))
    yield rollout
    rollout.process.stop()


@pytest.fixture(scope="module")
def served(
    model_dir: Path, trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HttpRollout]:
    """A torch rollout serving version 1, open (no token): what an attacker reaches first."""
    rollout = start(model_dir, tmp_path_factory.mktemp("served"), args=["--weights", str(trained_checkpoint)])
    yield rollout
    rollout.process.stop()


# -- authentication on every route -----------------------------------------------------------------


def check_auth(rollout: HttpRollout, method: str, path: str, template: dict[str, Any] | None, stream: bool) -> None:
    """No token 401, a wrong one 403, the right one before the first commit 503 (/v1/models: 200, version 0)."""
    body = rollout.body(template, stream=True) if stream else rollout.body(template)
    answers = {token: rollout.send(method, path, body, token) for token in (None, "wrong", TOKEN)}
    assert answers[None].status_code == 401, answers[None].text
    assert answers[None].json()["error"]["code"] == "UNAUTHENTICATED"
    assert answers["wrong"].status_code == 403, answers["wrong"].text
    assert answers["wrong"].json()["error"]["code"] == "PERMISSION_DENIED"
    right = answers[TOKEN]
    if path == "/v1/models":
        assert right.status_code == 200 and right.json()["weight_version"] == 0, right.text
        assert [m["id"] for m in right.json()["data"]] == [rollout.model]
    else:
        assert right.status_code == 503 and right.headers["retry-after"], right.text
        assert right.json()["error"]["code"] == "NO_WEIGHTS"


@pytest.mark.parametrize(("method", "path", "template", "stream"), ROUTES, ids=ROUTE_IDS)
def test_every_route_wants_the_token_and_a_commit(
    gated: HttpRollout, method: str, path: str, template: dict[str, Any] | None, stream: bool
) -> None:
    check_auth(gated, method, path, template, stream)


def test_a_wrong_token_is_refused_before_the_body_is_read(gated: HttpRollout) -> None:
    """Auth comes first: a 100 MB Content-Length with a wrong token is 403 with no byte of the body sent."""
    status, _ = raw_request(gated, "/v1/chat/completions", 100_000_000, token="wrong")
    assert status == 403


# -- limits before work ----------------------------------------------------------------------------


def rss(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


class Probes:
    """/health over HTTP and Generate over gRPC, asked in turn on a thread until stopped: the slowest of each.

    The same probes run a few rounds before (`baseline`): on a loaded machine a Generate alone can take
    most of a second, so the bound is on what the attack adds.
    """

    def __init__(self, rollout: HttpRollout) -> None:
        self.rollout = rollout
        self.channel = grpc.insecure_channel(rollout.process.address)
        self.generate = pb_grpc.GenerateStub(self.channel)
        self.client = httpx.Client(timeout=30)
        self.generate.Generate(pb.GenerateRequest(prompt="the cat", max_tokens=1), timeout=30)  # warm
        self.baseline = self._rounds(5)
        self.slowest = {"health": 0.0, "generate": 0.0}
        self.count = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _round(self) -> dict[str, float]:
        started = time.perf_counter()
        assert self.client.get(self.rollout.base + "/health").status_code == 200
        health = time.perf_counter() - started
        started = time.perf_counter()
        request = pb.GenerateRequest(prompt="the cat", max_tokens=1)
        assert self.generate.Generate(request, timeout=30).weight_version == 1
        return {"health": health, "generate": time.perf_counter() - started}

    def _rounds(self, count: int) -> dict[str, float]:
        rounds = [self._round() for _ in range(count)]
        return {kind: max(r[kind] for r in rounds) for kind in rounds[0]}

    def _run(self) -> None:
        while not self._done.is_set():
            took = self._round()
            self.slowest = {kind: max(self.slowest[kind], took[kind]) for kind in took}
            self.count += 1
            time.sleep(0.01)

    def __enter__(self) -> Probes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        while self.count < 3 and self._thread.is_alive():
            time.sleep(0.05)
        self._done.set()
        self._thread.join(60)
        self.client.close()
        self.channel.close()

    def check(self, kinds: tuple[str, ...] = ("health", "generate"), bound: float = 0.5) -> None:
        """Every answer of these kinds during the attack came within `bound` s (plus the slowest before it)."""
        assert self.count >= 3, "the probes never answered"
        for kind in kinds:
            slowest = self.slowest[kind]
            assert slowest < bound + self.baseline[kind], f"{kind}: {slowest:.2f} s, before: {self.baseline}"


def raw_request(
    rollout: HttpRollout, path: str, size: int, *, chunked: bool = False, token: str | None = None
) -> tuple[int, int]:
    """POSTs a `size`-byte body of spaces: (status, bytes of the body sent).

    With a Content-Length, no byte of the body is sent before the answer (a rollout that waited for it
    would time out here). Chunked, the body is sent while the rollout reads it, and no more once an
    answer arrives (so that the answer is not lost to a reset).
    """
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Authorization: Bearer {token}\r\n" if token else ""
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {size}\r\n\r\n"
    piece = b" " * (256 << 10)
    sent = 0
    with socket.create_connection(("127.0.0.1", rollout.http_port), timeout=30) as sock:
        sock.sendall(head.encode())
        while chunked and sent < size:
            readable, writable, _ = select.select([sock], [sock], [], 30)
            if readable:
                break
            if writable:
                data = (b"%x\r\n" % len(piece) + piece + b"\r\n") if chunked else piece
                try:
                    sock.sendall(data)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += len(piece)
        answer = sock.recv(4096)
    return int(answer.split(b" ", 2)[1]), sent


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_100_mb_body_is_refused_unread_while_health_and_generate_answer(served: HttpRollout, chunked: bool) -> None:
    before = rss(served.process.pid)
    with Probes(served) as probes:
        for _ in range(3):
            status, sent = raw_request(served, "/v1/completions", 100_000_000, chunked=chunked)
            assert status == 413
            # Declared: refused before a byte is read; streamed: once the limit is passed.
            # Streamed: what the rollout read (the limit) and what the sockets' buffers held.
            assert sent <= (GENERATE_REQUEST_BYTES + 16 * MIB if chunked else 0), sent
    probes.check()
    assert rss(served.process.pid) - before < 64 * MIB
    served.traceback_free()


def test_a_100_mb_weight_checker_baseline_is_refused_unread(served: HttpRollout) -> None:
    assert raw_request(served, "/weight_checker", 100_000_000) == (413, 0)
    served.traceback_free()


def test_20000_prompts_x_64_are_refused_at_once_at_no_memory_cost(served: HttpRollout) -> None:
    body = {"model": served.model, "prompt": [[5, 6]] * 20_000, "n": 64, "max_tokens": 16}
    served.send("POST", "/v1/completions", COMPLETION | {"model": served.model})  # warm
    before = rss(served.process.pid)
    started = time.perf_counter()
    answer = served.send("POST", "/v1/completions", body)
    took = time.perf_counter() - started
    assert answer.status_code == 400, answer.text
    assert str(MAX_CHOICES) in answer.json()["error"]["message"]
    assert took < 1.0, f"{took:.2f} s"
    time.sleep(0.5)
    assert rss(served.process.pid) - before < 64 * MIB
    # Within the limit the same shape is answered: prompts x n = 64.
    ok = served.send("POST", "/v1/completions", body | {"prompt": [[5, 6]] * 4, "n": 16, "max_tokens": 1})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 64, ok.text


def test_4_mb_of_chat_messages_are_refused_without_stalling_health(served: HttpRollout) -> None:
    message = {"role": "user", "content": "hi"}
    count = (GENERATE_REQUEST_BYTES - 4096) // len(json.dumps(message) + ", ")
    body = {"model": served.model, "messages": [message] * count, "max_tokens": 2}
    assert len(json.dumps(body)) > 4_000_000
    with Probes(served) as probes:
        for _ in range(3):
            answer = served.send("POST", "/v1/chat/completions", body)
            assert answer.status_code == 400, answer.text
            assert "messages" in answer.json()["error"]["message"]
    # Parsing 4 MB of JSON holds the interpreter lock (~0.25 s here): the loop waits that long, and
    # Generate, which needs the lock to decode, slows while it lasts; the acceptance bound is /health's.
    probes.check(("health",))
    served.traceback_free()


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# Each: the route, the body (JSON text, or an object merged into the route's valid body), the status.
BAD = {
    "stop_token_ids not ids": ("completions", {"stop_token_ids": ["x"]}, 400),
    "seed 2**70": ("completions", {"seed": 2**70}, 400),
    "n 0": ("completions", {"n": 0}, 400),
    "n 65": ("chat", {"n": MAX_CHOICES + 1}, 400),
    "2 prompts x n 64": ("completions", {"prompt": ["a", "b"], "n": MAX_CHOICES}, 400),
    "max_tokens a string": ("completions", {"max_tokens": "16"}, 400),
    "max_tokens 0": ("chat", {"max_tokens": 0}, 400),
    "temperature a string": ("chat", {"temperature": "hot"}, 400),
    "top_p 2": ("completions", {"top_p": 2}, 400),
    "logprobs a list": ("completions", {"logprobs": [1]}, 400),
    "chat logprobs a number": ("chat", {"logprobs": 3}, 400),
    "stream a string": ("chat", {"stream": "yes"}, 400),
    "stream_options a list": ("completions", {"stream": True, "stream_options": [1]}, 400),
    "stop a number": ("completions", {"stop": 7}, 400),
    "min_weight_version negative": ("completions", {"min_weight_version": -1}, 400),
    "messages a string": ("chat", {"messages": "hi"}, 400),
    "prompt of lists of strings": ("completions", {"prompt": [["a"]]}, 400),
    "model unknown": ("chat", {"model": "gpt-4"}, 404),
    "model a number": ("completions", {"model": 3}, 400),
    "not JSON": ("completions", "{not json", 400),
    "a JSON list": ("completions", "[1, 2]", 400),
    "deep past Python's recursion limit": ("completions", '{"prompt": ' + deep(100_000) + "}", 400),
    "deep within it": ("chat", '{"messages": [{"role": "user", "content": ' + deep(900) + "}]}", 400),
    "checker action unknown": ("checker", {"action": "verify"}, 400),
    "checker action a list": ("checker", {"action": ["checksum"]}, 400),
    "checker reset (zeroes the weights)": ("checker", {"action": "reset"}, 400),
    "checker compare without baseline": ("checker", {"action": "compare"}, 400),
    "checker baseline a list": ("checker", {"action": "compare", "baseline": ["x"]}, 400),
    "checker baseline digest a number": ("checker", {"action": "compare", "baseline": {"a": 1}}, 400),
    "checker not JSON": ("checker", "{not json", 400),
    "checker deep": ("checker", '{"action": "compare", "baseline": {"a": ' + deep(100_000) + "}}", 400),
    "checker compare": ("checker", {"action": "compare", "baseline": {"a": "b"}}, 200),
}


def test_bad_fields_and_deep_json_are_400_with_a_message_and_no_traceback(served: HttpRollout) -> None:
    paths = {
        "completions": ("/v1/completions", COMPLETION),
        "chat": ("/v1/chat/completions", CHAT),
        "checker": ("/weight_checker", CHECKER),
    }
    got = {}
    for name, (route, body, _) in BAD.items():
        path, valid = paths[route]
        content = body if isinstance(body, str) else json.dumps(valid | {"model": served.model} | body)
        answer = httpx.post(
            served.base + path, content=content, headers={"Content-Type": "application/json"}, timeout=60
        )
        got[name] = answer.status_code
        if answer.status_code != 200:
            message = answer.json()["error"]["message"]
            assert message and "internal error" not in message, (name, message)
    assert got == {name: status for name, (_, _, status) in BAD.items()}
    served.traceback_free()


def test_a_slowloris_socket_is_dropped_at_the_header_deadline(served: HttpRollout) -> None:
    """Headers sent a line at a time and never finished: the rollout closes the socket after HEADER_SECONDS."""
    sockets = [socket.create_connection(("127.0.0.1", served.http_port), timeout=60) for _ in range(20)]
    started = time.monotonic()
    try:
        for sock in sockets:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        time.sleep(HEADER_SECONDS / 2)
        for sock in sockets:
            sock.sendall(b"X-Slow: 1\r\n")  # still sending, never finishing
        assert httpx.get(served.base + "/health", timeout=5).status_code == 200
        for sock in sockets:
            assert sock.recv(1024) == b""  # closed by the rollout
        closed = time.monotonic() - started
    finally:
        for sock in sockets:
            sock.close()
    assert HEADER_SECONDS - 1 < closed < HEADER_SECONDS + 10, f"{closed:.1f} s"


# -- the vLLM engine: the same guards before vLLM's serving layer -----------------------------------


@pytest.mark.vllm
def test_vllm_routes_want_the_token_and_refuse_before_vllm_serves(model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed")
    rollout = start(model_dir, tmp_path, engine="vllm", args=token_args(tmp_path))
    try:
        for method, path, template, stream in ROUTES:
            check_auth(rollout, method, path, template, stream)
        many = rollout.body(COMPLETION, prompt=[[5, 6]] * 20_000, n=64)
        answer = rollout.send("POST", "/v1/completions", many, TOKEN)
        assert answer.status_code == 400 and str(MAX_CHOICES) in answer.json()["error"]["message"], answer.text
        for bad in ({"n": 0}, {"seed": 2**70}, {"stop_token_ids": ["x"]}):
            answer = rollout.send("POST", "/v1/chat/completions", rollout.body(CHAT, **bad), TOKEN)
            assert answer.status_code == 400, (bad, answer.text)
        assert (
            rollout.send("POST", "/v1/completions", rollout.body(COMPLETION, model="other"), TOKEN).status_code == 404
        )
        status, sent = raw_request(rollout, "/v1/completions", 100_000_000, token=TOKEN)
        assert (status, sent) == (413, 0)
        rollout.traceback_free()
    finally:
        rollout.process.stop()
