"""An in-process window of encoded chunks, shared by every rollout's stream of a push, so each chunk is
encoded once and the trainer holds a bounded number of them whatever the number of rollouts."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from tqdm import tqdm

__all__ = ["ChunkWindow", "counted"]


class ChunkWindow:
    """Hands one stream of encoded chunks to several readers, holding at most `window` of them.

    Chunks are produced lazily by whichever reader is ahead; a reader that gets `window` chunks
    ahead of the slowest waits. A reader that fails leaves, so it never holds the others back.

    If making a chunk fails (a tensor that cannot be encoded), the failure is kept in `failure` and every
    reader ends, not just the one that happened to make it: each rollout's push then fails with its cause.
    """

    def __init__(self, source: Iterator[bytes], *, consumers: int, window: int) -> None:
        self._source = source
        self.failure: Exception | None = None
        self._window = window
        self._cond = threading.Condition()
        self._chunks: dict[int, bytes] = {}
        self._produced = 0
        self._exhausted = False
        self._positions = dict.fromkeys(range(consumers), 0)
        self._skips: dict[int, bytes | bytearray] = {}  # slot -> a mask of chunk positions its rollout already holds

    def reader(self, slot: int) -> Iterator[bytes]:
        try:
            while (chunk := self._next(slot)) is not None:
                yield chunk
        finally:
            self.leave(slot)

    def shared_reader(self, slot: int, streams: int) -> Callable[[], Iterator[bytes]]:
        """Returns a factory of `streams` iterators that share one slot: each chunk goes to one of them.

        The slot is left when the last of them ends, or as soon as one fails.
        """
        remaining = [streams]

        def one() -> Iterator[bytes]:
            finished = False
            try:
                while (chunk := self._next(slot)) is not None:
                    yield chunk
                finished = True
            finally:
                with self._cond:
                    remaining[0] -= 1
                    last = remaining[0] == 0
                if last or not finished:
                    self.leave(slot)

        return one

    def skip(self, slot: int, mask: bytes | bytearray) -> None:
        """Reader `slot` passes over the chunks at positions where `mask` is non-zero (a resumed update's)."""
        with self._cond:
            self._skips[slot] = mask

    def leave(self, slot: int) -> None:
        with self._cond:
            if self._positions.pop(slot, None) is not None:
                self._evict()
                self._cond.notify_all()

    def _next(self, slot: int) -> bytes | None:
        with self._cond:
            while True:
                # Re-read after every wait: other streams of the same rollout share this slot.
                position = self._positions.get(slot)
                if position is None:
                    return None  # the slot left: another stream of the same rollout failed
                if position < self._produced:
                    self._positions[slot] = position + 1
                    message = self._chunks[position]
                    self._evict()
                    self._cond.notify_all()
                    mask = self._skips.get(slot)
                    if mask is not None and position < len(mask) and mask[position]:
                        continue  # this reader's rollout holds it already
                    return message
                if self._exhausted:
                    return None
                if self._produced - min(self._positions.values()) < self._window:
                    try:
                        chunk = next(self._source, None)
                    except Exception as error:  # noqa: BLE001 - kept for every reader's push to report
                        self.failure, chunk = error, None
                    if chunk is None:
                        self._exhausted = True
                        continue
                    self._chunks[self._produced] = chunk
                    self._produced += 1
                    self._cond.notify_all()
                else:
                    self._cond.wait()

    def _evict(self) -> None:
        oldest = min(self._positions.values(), default=self._produced)
        for index in [i for i in self._chunks if i < oldest]:
            del self._chunks[index]


def counted(chunks: Iterator[bytes], bar: tqdm) -> Iterator[bytes]:
    for chunk in chunks:
        yield chunk
        bar.update(len(chunk))
