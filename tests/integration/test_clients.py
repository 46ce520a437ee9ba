"""Clients in other languages, from proto/ alone, against a real rollout: JavaScript (@grpc/grpc-js) and Go.

Each client reads WeightSync.GetStatus, calls Generate.Generate and prints the protobuf JSON mapping of
both (proto field names, uint64 as strings). `make clients` installs and builds them (`make test` does it
first); a client's tests skip only where its toolchain could not be installed, with the reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest

from rollout_side.engines.torch_engine import TorchEngine
from rollout_side.server import create_server
from rollout_side.transport.auth import ServerSecurity
from rollout_side.update.receiver import Receiver
from trainer_side.publisher import Publisher
from weightsync.v1 import weightsync_pb2 as pb

from conftest import ROOT

PROMPT = "monday tuesday"
MAX_TOKENS = 12
TS_DIR = ROOT / "clients" / "ts"
GO_DIR = ROOT / "clients" / "go"

CLIENTS = {
    # name: (make target, what it leaves once ready, where it writes why it could not build)
    "javascript": ("ts-client", TS_DIR / "node_modules" / ".installed", TS_DIR / ".unavailable"),
    "go": ("go-client", GO_DIR / ".build" / "bin" / "weightsync-client", GO_DIR / ".unavailable"),
}


def build(name: str) -> list[str]:
    """Runs the client's make target (a no-op once built) and returns its command line, or skips."""
    target, ready, unavailable = CLIENTS[name]
    if shutil.which("make") is None:
        pytest.skip(f"{name} client: make is not installed, so `make {target}` cannot build it")
    done = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), target], capture_output=True, text=True)
    assert done.returncode == 0, f"make {target} failed:\n{done.stdout}\n{done.stderr}"
    if not ready.exists():
        reason = unavailable.read_text().strip() if unavailable.exists() else f"make {target} built nothing"
        pytest.skip(f"{name} client toolchain unavailable: {reason}")
    if name == "javascript":
        node = shutil.which("node")
        if node is None:
            pytest.skip("javascript client: node is not installed (npm is, so node_modules exist)")
        return [node, str(TS_DIR / "client.js")]
    return [str(ready)]


@pytest.fixture(scope="module", params=list(CLIENTS))
def client(request: pytest.FixtureRequest) -> list[str]:
    return build(request.param)


def run(client: list[str], address: str, *flags: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [*client, "--max-tokens", str(MAX_TOKENS), *flags, address, PROMPT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode in (0, 1), f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.returncode, json.loads(done.stdout)


def test_client_sees_unavailable_before_the_first_push(client, rollout) -> None:  # type: ignore[no-untyped-def]
    code, out = run(client, rollout.address)
    assert code == 1, out
    assert out["error"]["name"] == "UNAVAILABLE" and out["error"]["code"] == 14, out
    assert (out["error"]["reason"], out["error"]["domain"]) == ("NO_WEIGHTS", "weightsync.v1"), out
    assert out["status"]["weight_version"] == "0"
    assert out["status"]["state"] == "ROLLOUT_STATE_DUMMY"
    assert out["status"]["fingerprint"] == ""
    assert "response" not in out


def test_client_generates_what_python_does_with_the_pushed_version(client, rollout, trained_state) -> None:  # type: ignore[no-untyped-def]
    with Publisher([rollout.address], progress=False) as publisher:
        [result] = publisher.push(trained_state, version=7)
    assert result.ok, result.error
    expected = rollout.generate.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=MAX_TOKENS), timeout=30)
    assert expected.weight_version == 7 and expected.token_ids

    code, out = run(client, rollout.address)
    assert code == 0, out
    status, response = out["status"], out["response"]
    assert int(status["weight_version"]) == 7
    assert status["fingerprint"] == result.fingerprint
    assert status["state"] == "ROLLOUT_STATE_SERVING"
    assert status["engine"] == "torch"
    assert int(response["weight_version"]) == 7
    assert response["token_ids"] == list(expected.token_ids)
    assert response["text"] == expected.text
    assert response["finish_reason"] == expected.finish_reason


def test_client_sends_the_bearer_token(client, loop_thread, model_dir, trained_state, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A rollout that guards both services: refused without the token, served with it."""
    token = "s3cret-token"

    async def boot():  # type: ignore[no-untyped-def]
        receiver = Receiver(TorchEngine(model_dir))
        await receiver.start()
        security = ServerSecurity(token=token, generate_token=token)
        return await create_server(receiver, address="127.0.0.1:0", security=security)

    server = loop_thread.run(boot())
    address = f"127.0.0.1:{server.port}"
    try:
        with Publisher([address], progress=False, token=token) as publisher:
            assert publisher.push(trained_state, version=2)[0].ok
        code, out = run(client, address)
        assert code == 1 and out["error"]["name"] == "UNAUTHENTICATED", out
        assert out["error"]["reason"] == "UNAUTHENTICATED", out
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        code, out = run(client, address, "--token-file", str(token_file))
        assert code == 0, out
        assert int(out["status"]["weight_version"]) == 2 and int(out["response"]["weight_version"]) == 2
    finally:
        loop_thread.run(server.stop(grace=0))


def test_client_asks_for_logprobs(client, rollout, trained_state) -> None:  # type: ignore[no-untyped-def]
    """--logprobs (-logprobs in Go) sets GenerateRequest.logprobs; the JSON carries one per token, as Python's."""
    with Publisher([rollout.address], progress=False) as publisher:
        [result] = publisher.push(trained_state, version=8)
    assert result.ok, result.error
    request = pb.GenerateRequest(prompt=PROMPT, max_tokens=MAX_TOKENS, logprobs=True)
    expected = rollout.generate.Generate(request, timeout=30)
    assert expected.weight_version == 8 and len(expected.logprobs) == len(expected.token_ids) > 0

    code, out = run(client, rollout.address, "--logprobs")
    assert code == 0, out
    response = out["response"]
    assert int(response["weight_version"]) == 8
    assert response["token_ids"] == list(expected.token_ids)
    assert len(response["logprobs"]) == len(response["token_ids"])
    assert response["logprobs"] == pytest.approx(list(expected.logprobs), abs=1e-6)
