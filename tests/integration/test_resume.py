"""Updates owned by a live trainer, and resumable: real processes and sockets, rollouts on their default idle timeout.

A SIGKILLed `push` no longer blocks the next one for the idle timeout: its update is interrupted as soon
as its stream ends, and a re-run of the same version resumes it, sending only what the rollout lacks
(bytes counted by a TCP proxy in front of the rollout). A cut connection is resumed inside the same
`push()` call; a second live trainer is refused with the first one's version, age and peer; `abort`
drops an update; re-pushing the committed version is ok.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rollout_side.process import RolloutProcess
from trainer_side.publisher import DEFAULT_CHUNK_BYTES, Publisher
from trainer_side.train import greedy, new_model
from weightsync.errors import Reason, metadata_of, reason_of
from weightsync.manifest import PIECE_BYTES, manifest_of_state
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

import raw
from conftest import Rollout, reference_model
from proxy import Proxy

# The tiny model, grown to a >= 500 MB bf16 checkpoint: wide MLPs, few tensors (cheap to boot and to write).
BIG = {
    "hidden_size": 1024,
    "intermediate_size": 5632,
    "num_hidden_layers": 13,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 8192,
    "max_window_layers": 13,
}
SLACK = 0.05  # a re-run may move this much of the checkpoint beyond what the rollout lacked


def write_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """A bf16 safetensors file of these shapes, written directly from a tiled random block; returns its payload bytes.

    Finite values (exponents below 0x7f), so any engine takes them; what they are does not matter here.
    """
    block = torch.randint(0, 0x3F00, (1 << 22,), dtype=torch.int16, generator=torch.Generator().manual_seed(0))
    data = block.numpy().tobytes()
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as out:
        out.write(len(encoded).to_bytes(8, "little") + encoded)
        for i, name in enumerate(shapes):
            start, end = header[name]["data_offsets"]
            left, at = end - start, (i * 7919 * 2) % len(data)  # each tensor starts elsewhere in the block
            while left:
                piece = data[at : at + left]
                out.write(piece)
                left -= len(piece)
                at = 0
    return offset


@pytest.fixture(scope="module")
def big(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """(model folder, checkpoint, payload bytes): the tiny model's tokenizer, a config 100 times larger."""
    folder = tmp_path_factory.mktemp("big") / "model"
    folder.mkdir()
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    config = json.loads((model_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **BIG}, indent=2))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    checkpoint = folder.parent / "big.safetensors"
    total = write_checkpoint(checkpoint, shapes)
    assert total >= 500e6
    return folder, checkpoint, total


@pytest.fixture(scope="module")
def big_rollout(big: tuple[Path, Path, int]) -> Iterator[RolloutProcess]:
    """A rollout process of the big model on its default idle timeout (60 s), as users run it."""
    log = big[0].parent / "rollout.log"
    rollout = RolloutProcess(big[0], log=log)
    yield rollout
    rollout.stop()
    print(log.read_text()[-4000:])  # shown on failure


def status(address: str) -> pb.GetStatusResponse:
    with grpc.insecure_channel(address) as channel:
        answer: pb.GetStatusResponse = pb_grpc.WeightSyncStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
        return answer


def push_command(checkpoint: Path, version: int, address: str) -> list[str]:
    push = [sys.executable, "-m", "trainer_side", "push", "--checkpoint", str(checkpoint)]
    return [*push, "--version", str(version), "--rollouts", address]


@pytest.mark.parametrize("mark", [0.2, 0.5, 0.8])
def test_a_killed_push_resumes_at_once_and_sends_only_what_is_missing(
    big: tuple[Path, Path, int], big_rollout: RolloutProcess, mark: float
) -> None:
    _, checkpoint, total = big
    served = status(big_rollout.address).weight_version
    version = served + 1
    proxy = Proxy(big_rollout.address)
    try:
        trainer = subprocess.Popen(
            push_command(checkpoint, version, proxy.address), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while (now := status(big_rollout.address)).received_bytes < mark * total or now.receiving_version != version:
            assert trainer.poll() is None, f"the push ended before {mark:.0%}: {trainer.communicate()}"
            assert time.monotonic() < deadline, "the push never got going"
            time.sleep(0.005)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        while (held := status(big_rollout.address)).state == pb.ROLLOUT_STATE_RECEIVING:
            time.sleep(0.01)  # the rollout sees the stream end at once (no idle timeout: that is 60 s)
        assert held.update_id and held.receiving_version == version  # interrupted, held for a resume
        assert held.weight_version == served  # the served version is untouched
        assert held.received_bytes >= mark * total

        proxy.reset()
        started = time.monotonic()
        rerun = subprocess.run(push_command(checkpoint, version, proxy.address), capture_output=True, text=True)
        seconds = time.monotonic() - started
        assert rerun.returncode == 0, rerun.stderr
        assert f"version {version} committed" in rerun.stdout and "resumed" in rerun.stdout, rerun.stdout
        assert seconds < 30, "the re-run waited for something"
        unsent = total - held.received_bytes
        assert proxy.sent <= unsent + SLACK * total, (proxy.sent, unsent, total)
        assert proxy.sent <= (1 - mark + SLACK) * total
        after = status(big_rollout.address)
        assert (after.weight_version, after.update_id) == (version, "")
    finally:
        proxy.close()


def test_a_cut_connection_is_resumed_by_the_same_push(big: tuple[Path, Path, int], big_rollout: RolloutProcess) -> None:
    from safetensors.torch import load_file

    _, checkpoint, total = big
    version = status(big_rollout.address).weight_version + 1
    proxy = Proxy(big_rollout.address)
    proxy.cut_after(total // 3)
    try:
        with Publisher([proxy.address], progress=False) as publisher:
            [result] = publisher.push(load_file(checkpoint), version)
        assert result.ok, result.error
        assert proxy.cuts == 1 and result.reconnects == 1
        assert result.held_bytes > total // 4  # resumed, not sent again
        assert proxy.sent <= total * (1 + SLACK)
        assert status(big_rollout.address).weight_version == version
    finally:
        proxy.close()


# -- on the small model ---------------------------------------------------------------------------


def stalled_update(rollout: Rollout, state, version: int) -> tuple[str, threading.Event, grpc.Future]:  # type: ignore[no-untyped-def]
    """An update begun by a trainer whose stream is open but sends nothing more: live, not interrupted."""
    tensors, manifest = raw.prepare(state)
    update_id = raw.begin(rollout.weight_sync, version, manifest).update_id
    chunks = raw.encoded_chunks(update_id, tensors, manifest)
    release = threading.Event()

    def stalled() -> Iterator[bytes]:
        yield chunks[0]
        release.wait(60)

    call = rollout.channel.stream_unary(
        "/weightsync.v1.WeightSync/PushChunks", request_serializer=None, response_deserializer=None
    ).future(stalled(), timeout=60)
    while status(rollout.address).received_bytes == 0:
        time.sleep(0.01)
    return update_id, release, call


def test_a_second_live_trainer_is_refused_with_the_others_version_age_and_peer(rollout: Rollout, trained_state) -> None:  # type: ignore[no-untyped-def]
    update_id, release, call = stalled_update(rollout, trained_state, 1)
    try:
        _, manifest = raw.prepare({k: v + 1 for k, v in trained_state.items()})
        with pytest.raises(grpc.RpcError) as info:
            raw.begin(rollout.weight_sync, 2, manifest)
        assert info.value.code() == grpc.StatusCode.ABORTED
        assert reason_of(info.value) is Reason.UPDATE_IN_PROGRESS
        meta = metadata_of(info.value)
        assert meta["update_id"] == update_id and meta["version"] == "1"
        assert meta["peer"].startswith("ipv") and "127.0.0.1" in meta["peer"]
        assert 0 <= float(meta["age_seconds"]) < 60
        assert meta["peer"] in info.value.details() and "version 1" in info.value.details()
    finally:
        release.set()
        call.cancel()


def test_abort_command_drops_a_live_update(rollout: Rollout, trained_state) -> None:  # type: ignore[no-untyped-def]
    update_id, release, call = stalled_update(rollout, trained_state, 1)
    try:
        command = [sys.executable, "-m", "trainer_side", "abort", "--rollouts", rollout.address]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"dropped update {update_id} (version 1)" in done.stdout
        assert status(rollout.address).update_id == ""
        with pytest.raises(grpc.RpcError) as info:  # the stalled trainer learns it when it speaks next
            rollout.weight_sync.Commit(pb.CommitRequest(update_id=update_id), timeout=10)
        assert reason_of(info.value) is Reason.UNKNOWN_UPDATE
        again = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "no update in progress" in again.stdout
    finally:
        release.set()
        call.cancel()
    with Publisher([rollout.address], progress=False) as publisher:
        assert publisher.push(trained_state, 1)[0].ok


def test_a_chunk_sent_again_is_ignored(rollout: Rollout, trained_state) -> None:  # type: ignore[no-untyped-def]
    tensors, manifest = raw.prepare(trained_state)
    update_id = raw.begin(rollout.weight_sync, 1, manifest).update_id
    chunks = raw.encoded_chunks(update_id, tensors, manifest)
    other = raw.encoded_chunks(update_id, [t + 1 for t in tensors], manifest)
    answer = raw.push_chunks(rollout.channel, [chunks[0], other[0], *chunks[1:], chunks[1]])  # again, and changed
    assert answer.chunks == len(chunks) + 2 and answer.bytes == manifest.total_bytes
    committed = rollout.weight_sync.Commit(pb.CommitRequest(update_id=update_id), timeout=30)
    assert committed.fingerprint == manifest.fingerprint  # what came first stayed


def test_pushing_the_committed_version_again_is_ok(rollout: Rollout, trained_state) -> None:  # type: ignore[no-untyped-def]
    with Publisher([rollout.address], progress=False) as publisher:
        first = publisher.push(trained_state, 3)[0]
        [again] = publisher.push(trained_state, 3)  # e.g. a retry after the Commit answer was lost
        assert again.ok and again.already and again.fingerprint == first.fingerprint
        [other] = publisher.push({k: v + 1 for k, v in trained_state.items()}, 3)
        assert not other.ok and other.reason is Reason.STALE_VERSION


def test_a_resume_with_other_bytes_is_refused_at_commit_and_sent_afresh(  # type: ignore[no-untyped-def]
    rollout: Rollout, trained_state, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A crashed run of version 1 left chunks of *other* weights of the same layout: the re-run resumes
    (checksums pending: the layout is all BeginUpdate shows), Commit refuses the mix, the push sends afresh."""
    stale = new_model(model_dir, seed=5).state_dict()
    tensors, manifest = raw.prepare(stale)
    request = pb.BeginUpdateRequest(
        version=1,
        manifest=raw.wire.manifest_to_proto(manifest.with_piece_bytes(PIECE_BYTES)),  # pending, as `push` sends
        chunk_bytes=DEFAULT_CHUNK_BYTES,
        update_id="crashed-run",
        checksums_at_commit=True,
    )
    rollout.weight_sync.BeginUpdate(request, timeout=30)
    chunks = raw.encoded_chunks("crashed-run", tensors, manifest, DEFAULT_CHUNK_BYTES)
    raw.push_chunks(rollout.channel, chunks[: len(chunks) // 2])  # then the run died
    with Publisher([rollout.address], progress=False) as publisher:
        [result] = publisher.push(trained_state, 1)
    assert "does not match its checksum" in caplog.text and "sending it afresh" in caplog.text
    assert result.ok and result.fingerprint == manifest_of_state(trained_state).fingerprint, result
    ids = [1, 2, 3]
    answer = rollout.generate.Generate(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=8), timeout=30)
    assert list(answer.token_ids) == greedy(reference_model(model_dir, trained_state), ids, 8)  # its bytes only


def test_abort_is_authenticated_like_a_push(model_dir: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    with RolloutProcess(model_dir, args=["--auth-token-file", str(token)]) as rollout:
        command = [sys.executable, "-m", "trainer_side", "abort", "--rollouts", rollout.address]
        refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused
        allowed = subprocess.run(
            [*command, "--auth-token-file", str(token)], capture_output=True, text=True, timeout=60
        )
        assert allowed.returncode == 0 and "no update in progress" in allowed.stdout, allowed
