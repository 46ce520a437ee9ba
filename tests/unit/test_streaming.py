"""Unit tests of the pieces behind streaming: incremental tensor checks, the shared chunk window, memory."""

from __future__ import annotations

import random
import threading
import weakref
from collections.abc import Iterator

import pytest
import torch

from rollout_side.update.staging import Verifier
from trainer_side.chunk_window import ChunkWindow
from weightsync.manifest import build_manifest, tensor_bytes, wire_sources, wire_tensors
from weightsync.memory import keep_freed_memory, prefaulted_buffer


def _layout(sizes: list[int]) -> tuple[torch.Tensor, object]:
    gen = torch.Generator().manual_seed(len(sizes))
    tensors = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).view(torch.bfloat16) for n in sizes]
    manifest = build_manifest((f"t{i}", t) for i, t in enumerate(tensors))
    flat = torch.cat([t.view(torch.uint8) for t in tensors]) if tensors else torch.empty(0, dtype=torch.uint8)
    return flat, manifest


@pytest.mark.parametrize("sizes", [[0, 8, 0], [4096, 2, 10000, 0], [2], [], [30000, 30000]])
@pytest.mark.parametrize("step", [1, 6, 1000, 1 << 20])
def test_verifier_checks_every_tensor_fed_in_pieces(sizes: list[int], step: int) -> None:
    flat, manifest = _layout(sizes)
    verifier = Verifier(manifest, tensor_bytes(flat))  # type: ignore[arg-type]
    for end in range(step, flat.numel() + step, step):
        verifier.feed(min(end, flat.numel()))
    verifier.feed(flat.numel())
    assert verifier.mismatch is None
    assert verifier.position == flat.numel()


def test_verifier_names_the_first_tensor_that_differs() -> None:
    flat, manifest = _layout([100, 200, 300])
    flat[150] ^= 1  # inside t1 (bytes 100..300)
    flat[400] ^= 1  # inside t2
    verifier = Verifier(manifest, tensor_bytes(flat))  # type: ignore[arg-type]
    verifier.feed(flat.numel())
    assert verifier.mismatch == "t1"


def test_shared_reader_splits_chunks_across_streams_once_each() -> None:
    window = ChunkWindow(iter([bytes([i]) for i in range(200)]), consumers=2, window=4)
    got: dict[int, list[bytes]] = {0: [], 1: [], 2: []}
    make = window.shared_reader(0, 3)

    def drain(k: int) -> None:
        for chunk in make():
            got[k].append(chunk)

    threads = [threading.Thread(target=drain, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    other = list(window.reader(1))  # the other rollout sees every chunk, in order
    for t in threads:
        t.join(10)
    assert sorted(c for k in got for c in got[k]) == [bytes([i]) for i in range(200)]
    assert other == [bytes([i]) for i in range(200)]


def test_shared_reader_stops_every_stream_when_one_fails() -> None:
    window = ChunkWindow(iter([bytes([i % 256]) for i in range(100)]), consumers=1, window=8)
    make = window.shared_reader(0, 2)
    first, second = make(), make()
    next(first)
    next(second)
    first.close()  # a stream that ends without finishing: the rollout's slot is left
    assert list(second) == []


def test_a_chunk_that_fails_to_be_made_ends_every_reader_and_is_kept() -> None:
    """Not only the reader that happened to make it: every rollout's push must see why its stream ended."""

    def source() -> Iterator[bytes]:
        yield from (bytes([i]) for i in range(5))
        raise MemoryError("out of memory casting tensor 'w'")

    window = ChunkWindow(source(), consumers=2, window=8)
    first, second = window.reader(0), window.reader(1)
    assert list(first) == [bytes([i]) for i in range(5)]  # no exception out of a gRPC request iterator
    assert list(second) == [bytes([i]) for i in range(5)]
    assert isinstance(window.failure, MemoryError) and "tensor 'w'" in str(window.failure)


def test_prefaulted_buffer_is_a_writable_flat_buffer() -> None:
    for nbytes in (0, 1, 4097, 3 << 20):
        buffer = prefaulted_buffer(nbytes)
        assert buffer.dtype == torch.uint8 and buffer.shape == (nbytes,)
        buffer.fill_(7)
        assert int(buffer.sum()) == 7 * nbytes
    data = bytes(random.Random(0).randbytes(5000))
    buffer = prefaulted_buffer(5000)
    tensor_bytes(buffer)[:] = data
    assert bytes(tensor_bytes(buffer)) == data


def test_keep_freed_memory_is_idempotent() -> None:
    first = keep_freed_memory()
    assert keep_freed_memory() == first


def test_streamed_version_casts_one_tensor_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 sources go out as the same chunks and checksums as a cast-first version, holding at most the
    casts the chunk in hand spans, not a cast copy of the model."""
    from trainer_side import outgoing

    gen = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(n, generator=gen) for i, n in enumerate([3000, 10, 0, 70000, 5, 40000])}
    live: set[int] = set()
    most = [0]

    def counted(tensor: torch.Tensor) -> torch.Tensor:
        cast = tensor.to(torch.bfloat16)
        live.add(id(cast))
        weakref.finalize(cast, live.discard, id(cast))
        most[0] = max(most[0], len(live))
        return cast

    monkeypatch.setattr(outgoing, "to_wire", counted)
    streamed = outgoing.Outgoing.streamed(1, wire_sources(state))
    chunks = list(streamed.chunks("u", 16 << 10))
    eager = dict(wire_tensors(state))
    manifest = build_manifest(eager.items())
    assert chunks == list(outgoing.Outgoing.full(1, manifest, list(eager.values())).chunks("u", 16 << 10))
    assert streamed.manifest == manifest and streamed.wire_bytes == manifest.total_bytes
    assert most[0] <= 2, f"{most[0]} casts alive at once"
