"""The OpenAI-compatible HTTP face, driven by the official `openai` client, on the torch engine."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from test_rl_generate import boot, hf_greedy, hf_model, perturbed, stop
from transformers import PreTrainedModel

from rollout_side.process import RolloutProcess, free_port
from rollout_side.serving.openai_api import HttpServer, start_http
from rollout_side.transport.auth import ServerSecurity
from trainer_side.publisher import Publisher

from conftest import LoopThread, Rollout

openai = pytest.importorskip("openai")


class Served:
    """A rollout with its HTTP face and an `openai` client for it."""

    def __init__(self, loop: LoopThread, rollout: Rollout, http: HttpServer, api_key: str = "unused") -> None:
        self.loop, self.rollout, self.http = loop, rollout, http
        self.base_url = f"http://127.0.0.1:{http.port}"
        self.client = openai.OpenAI(base_url=self.base_url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def close(self) -> None:
        self.client.close()
        self.loop.run(self.http.stop())
        stop(self.loop, self.rollout)


def serve(loop: LoopThread, model_dir: Path, weights: Path | None, token: str | None = None) -> Served:
    rollout = boot(loop, model_dir, weights)
    security = ServerSecurity(generate_token=token)
    generation = rollout.server.generation
    http = loop.run(start_http(generation, host="127.0.0.1", port=0, model="tiny", security=security))
    return Served(loop, rollout, http, api_key=token or "unused")


@pytest.fixture(scope="module")
def served(loop_thread: LoopThread, model_dir: Path, trained_checkpoint: Path) -> Iterator[Served]:
    s = serve(loop_thread, model_dir, trained_checkpoint)
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(model_dir: Path, trained_state: dict[str, torch.Tensor]) -> PreTrainedModel:
    return hf_model(model_dir, trained_state)


def extra(model: Any, name: str) -> Any:
    return (model.model_extra or {})[name]


def test_gated_until_the_first_commit_then_weight_version(
    loop_thread: LoopThread, model_dir: Path, trained_state: dict[str, torch.Tensor]
) -> None:
    s = serve(loop_thread, model_dir, None)
    try:
        for call in (
            lambda: s.client.completions.create(model="tiny", prompt="the cat", max_tokens=4),
            lambda: s.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}]),
            lambda: list(s.client.completions.create(model="tiny", prompt="the cat", max_tokens=4, stream=True)),
        ):
            with pytest.raises(openai.APIStatusError) as info:
                call()
            assert info.value.status_code == 503
            assert info.value.response.headers["retry-after"]
            body = info.value.response.json()
            assert body["error"]["code"] == "NO_WEIGHTS" and body["error"]["message"] and body["error"]["type"]
        assert httpx.get(s.base_url + "/ready").status_code == 503
        assert httpx.get(s.base_url + "/health").status_code == 200
        with Publisher([s.rollout.address], progress=False) as publisher:
            assert publisher.push(trained_state, version=3)[0].ok
        ready = httpx.get(s.base_url + "/ready")
        assert ready.status_code == 200 and ready.json()["weight_version"] == 3
        raw = s.client.completions.with_raw_response.create(model="tiny", prompt="the cat", max_tokens=4)
        assert raw.headers["x-weight-version"] == "3"
        assert extra(raw.parse(), "weight_version") == 3
    finally:
        s.close()


def test_models(served: Served) -> None:
    models = served.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


@pytest.mark.parametrize("prompt", ["the cat sat", "one two three"])
def test_token_id_prompts_give_transformers_greedy_tokens_and_logprobs(
    served: Served, reference: PreTrainedModel, tokenizer: Any, prompt: str
) -> None:
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    out = served.client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0, logprobs=3)
    tokens, logp = hf_greedy(reference, ids, 10)
    [choice] = out.choices
    got = extra(choice, "token_ids")
    assert got == tokens[: len(got)] and len(got) > 0
    assert choice.text == tokenizer.decode(got, skip_special_tokens=True)
    assert extra(out, "weight_version") == 1
    assert choice.logprobs is not None
    for step, (token, value) in enumerate(zip(got, choice.logprobs.token_logprobs or [], strict=True)):
        assert abs(value - float(logp[step, token])) < 1e-3
    assert len(choice.logprobs.top_logprobs or []) == len(got)


def test_chat_uses_the_chat_template(served: Served, reference: PreTrainedModel, tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "the cat sat"}]
    out = served.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    tokens, _ = hf_greedy(reference, list(ids), 8)
    [choice] = out.choices
    assert extra(choice, "token_ids") == tokens[: len(extra(choice, "token_ids"))]
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(extra(choice, "token_ids"), skip_special_tokens=True)
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert len(choice.logprobs.content) == len(extra(choice, "token_ids"))
    assert len(choice.logprobs.content[0].top_logprobs) == 2
    assert extra(out, "weight_version") == 1


def test_streaming_equals_the_whole_answer(served: Served) -> None:
    kwargs: dict[str, Any] = {"model": "tiny", "prompt": "monday tuesday", "max_tokens": 12, "temperature": 0}
    whole = served.client.completions.create(**kwargs)
    chunks = list(served.client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(extra(c, "weight_version") == 1 for c in chunks)
    messages = [{"role": "user", "content": "one two"}]
    chat = served.client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    stream = served.client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts = list(stream)
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == chat.choices[0].message.content
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == len(extra(chat.choices[0], "token_ids"))


def test_n_by_seed_and_stop(served: Served) -> None:
    kwargs: dict[str, Any] = {"model": "tiny", "prompt": "the cat", "max_tokens": 10, "temperature": 2.0}
    first = served.client.completions.create(**kwargs, n=4, seed=11)
    again = served.client.completions.create(**kwargs, n=4, seed=11)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1
    plain = served.client.completions.create(model="tiny", prompt="monday", max_tokens=12, temperature=0)
    word = " " + plain.choices[0].text.split()[2]
    cut = served.client.completions.create(model="tiny", prompt="monday", max_tokens=12, temperature=0, stop=[word])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == plain.choices[0].text[: plain.choices[0].text.index(word)]
    streamed = served.client.completions.create(
        model="tiny", prompt="monday", max_tokens=12, temperature=0, stop=[word], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_min_weight_version_and_bad_requests(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        served.client.completions.create(
            model="tiny", prompt="the cat", max_tokens=2, extra_body={"min_weight_version": 9}
        )
    assert info.value.response.json()["error"]["code"] == "VERSION_NOT_REACHED"
    ok = served.client.completions.create(
        model="tiny", prompt="the cat", max_tokens=2, extra_body={"min_weight_version": 1}
    )
    assert extra(ok, "weight_version") == 1
    with pytest.raises(openai.BadRequestError):
        served.client.completions.create(model="tiny", prompt="the cat", max_tokens=2, logprobs=21)
    with pytest.raises(openai.BadRequestError):  # as vLLM refuses it
        served.client.completions.create(model="tiny", prompt="the cat", max_tokens=2, temperature=2.5)


def test_generate_token_guards_the_http_face(
    loop_thread: LoopThread, model_dir: Path, trained_checkpoint: Path
) -> None:
    s = serve(loop_thread, model_dir, trained_checkpoint, token="s3cret")
    try:
        out = s.client.completions.create(model="tiny", prompt="the cat", max_tokens=2)
        assert extra(out, "weight_version") == 1
        anonymous = openai.OpenAI(base_url=s.base_url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.PermissionDeniedError):
            anonymous.completions.create(model="tiny", prompt="the cat", max_tokens=2)
        assert httpx.post(s.base_url + "/v1/completions", json={"prompt": "x"}).status_code == 401
        assert httpx.get(s.base_url + "/ready").status_code == 200  # probes need no token
    finally:
        s.close()


def test_serve_http_port_end_to_end(model_dir: Path, trained_checkpoint: Path) -> None:
    """`python -m rollout_side serve --http-port`: the real command line, standalone weights, then SIGTERM."""
    http_port = free_port()
    args = ["--weights", str(trained_checkpoint), "--http-port", str(http_port), "--swap-policy", "abort"]
    with RolloutProcess(model_dir, args=args):
        base = f"http://127.0.0.1:{http_port}"
        assert httpx.get(base + "/ready", timeout=10).status_code == 200
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.completions.create(model=str(model_dir), prompt="the cat", max_tokens=3, temperature=0)
        assert extra(out, "weight_version") == 1 and out.choices[0].text


def test_a_busy_http_port_fails_at_start(model_dir: Path) -> None:
    base = [sys.executable, "-m", "rollout_side", "serve", "--model", str(model_dir), "--port", str(free_port())]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = subprocess.run(
            [*base, "--engine", "torch", "--http-port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert taken.returncode != 0 and "--http-port" in taken.stderr


def test_a_client_that_closes_a_stream_frees_the_engine(
    loop_thread: LoopThread, model_dir: Path, trained_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing a long SSE completion early stops decoding: the engine's worker is free long before the
    request would have finished, and a short request then completes on it."""
    s = serve(loop_thread, model_dir, trained_checkpoint)
    engine = s.rollout.receiver.engine
    decode_loop = engine._decode_loop
    decoded: list[int] = []
    live = threading.Event()

    def slow_decode_loop(*args: Any, **kwargs: Any) -> Iterator[Any]:
        """The engine's decoding, 50 ms a token (so the whole request takes ~20 s), counted."""
        live.set()
        try:
            for piece in decode_loop(*args, **kwargs):
                time.sleep(0.05)
                decoded.append(len(piece.token_ids))
                yield piece
        finally:
            live.clear()

    monkeypatch.setattr(engine, "_decode_loop", slow_decode_loop)
    max_tokens = 400
    try:
        stream = s.client.completions.create(
            model="tiny", prompt="the cat sat", max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True}
        )
        first = next(iter(stream))
        assert first.choices[0].text is not None
        assert live.is_set()
        stream.close()  # the client goes away mid-generation

        deadline = time.monotonic() + 15  # generous, and still short of the ~20 s a whole run takes
        while live.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not live.is_set(), f"still decoding after the client left ({sum(decoded)} tokens)"
        assert sum(decoded) < max_tokens
        # The engine's single worker thread is free: nothing is queued or running on it.
        engine._worker.submit(lambda: None).result(timeout=5)

        monkeypatch.setattr(engine, "_decode_loop", decode_loop)
        short = s.client.completions.create(model="tiny", prompt="the cat sat", max_tokens=4, temperature=0)
        assert short.choices[0].finish_reason in ("length", "stop")
    finally:
        monkeypatch.undo()
        s.close()


def test_each_choice_carries_its_version_when_prompts_straddle_a_swap(
    loop_thread: LoopThread, model_dir: Path, trained_checkpoint: Path, trained_state: dict[str, torch.Tensor]
) -> None:
    """Two prompts, one request, swap policy continue, a push while the first decodes: the first choice spans
    versions 1 and 2 (and says so per token), the second runs wholly on 2; the top level names the lowest."""
    rollout = boot(loop_thread, model_dir, trained_checkpoint, swap_policy="continue")
    http = loop_thread.run(start_http(rollout.server.generation, host="127.0.0.1", port=0, model="tiny"))
    s = Served(loop_thread, rollout, http)
    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(
                s.client.completions.create,
                model="tiny",
                prompt=[[5, 6, 7], [8, 9]],
                max_tokens=400,
                extra_body={"ignore_eos": True},
            )
            time.sleep(0.3)
            with Publisher([rollout.address], progress=False) as publisher:
                assert publisher.push(perturbed(trained_state), version=2)[0].ok
            out = answer.result(timeout=120)
        spanning, after = sorted(out.choices, key=lambda c: extra(c, "weight_version"))
        assert extra(spanning, "weight_version") == 1 and set(extra(spanning, "token_weight_versions")) == {1, 2}
        assert extra(after, "weight_version") == 2 and "token_weight_versions" not in (after.model_extra or {})
        assert extra(out, "weight_version") == 1
    finally:
        s.close()
