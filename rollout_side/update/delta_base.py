"""A delta applies only to the committed version's exact bytes: the spare staging buffer keeps them, where cheap.

A delta update patches a staged copy of the committed version, so the spare must hold that version's
exact bytes; copying the whole model per delta would cost more than the patch saves. What the spare
holds after a commit depends on the engine (see `Engine.load`):

- vLLM and torch on CUDA copy out of the staging buffer and hand it back: the spare *is* the
  committed version, for free.
- torch on CPU serves from the staging buffer itself (it never writes it) and hands back the buffer
  it served from before, which holds the previous version. After a delta the spare is brought up to
  date by copying only the elements that update changed from the live buffer (a few MB for a sparse
  step); after a full update, by one full copy. Both run on a worker thread after Commit has
  answered, while the trainer trains, so neither is on the critical path of a sync. The full copy
  is made only once this rollout has taken a delta: a trainer that never sends one (back-to-back
  full syncs) never pays for it; the first delta after boot rebuilds the copy instead (`settle`).

`fingerprint` names the version whose exact bytes the spare holds; anything that writes the spare
(an update in progress, a dropped one) clears it, and a delta is then refused with "send a full
version". Correctness never rests on this bookkeeping alone: every patched tensor is checked against
its manifest checksum before commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import numpy as np
import torch

from rollout_side.engines.base import Engine
from weightsync.delta import copy_elements
from weightsync.errors import BaseMismatch
from weightsync.manifest import Manifest

__all__ = ["DeltaBase", "same_layout"]

logger = logging.getLogger(__name__)

AFTER_COMMIT = 0.02  # seconds between a commit and the copy that brings the spare up to date


class DeltaBase:
    """The rollout half of the delta base: the spare buffer, what it holds, and the copy that keeps it current."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.buffer: torch.Tensor | None = None
        self.fingerprint = ""  # the version whose exact bytes `buffer` holds; "" = unknown
        self.manifest: Manifest | None = None  # the committed version's layout
        self._host: torch.Tensor | None = None  # a buffer holding the committed bytes that nothing writes
        self._loaded: torch.Tensor | None = None  # the staging buffer of the last successful load
        self._sync: asyncio.Future[None] | None = None
        self._deltas = False  # a delta has committed here: keep a base ready after full updates too

    @property
    def busy(self) -> bool:
        """A background copy is writing the spare: it must not be handed out."""
        return self._sync is not None and not self._sync.done()

    def take(self, nbytes: int) -> torch.Tensor:
        """The buffer to stage the next update in: the spare if it fits, else a new one."""
        spare, self.buffer, self.fingerprint = self.buffer, None, ""
        if spare is not None and spare.numel() == nbytes:
            return spare
        return self.engine.allocate_staging(nbytes)

    async def reserve(self, nbytes: int) -> None:
        """With no spare, allocates the next staging buffer in a thread, so `take` finds it: mapping and
        pre-faulting a model's worth of memory takes a while, and the event loop serves meanwhile."""
        if self.buffer is not None or self.busy:
            return
        buffer = await asyncio.to_thread(self.engine.allocate_staging, nbytes)
        if self.buffer is None:  # else another begin got one first: this one goes (a spare is one buffer)
            self.buffer, self.fingerprint = buffer, ""

    def put_back(self, staging: torch.Tensor) -> None:
        """Takes back the staging buffer of an update that did not commit; its bytes are unknown."""
        if self.buffer is None:
            self.buffer, self.fingerprint = staging, ""

    def committed_bytes(self, committed: str) -> torch.Tensor | None:
        """A buffer holding the committed version's exact bytes now, if any: the spare, or the one the
        engine serves from (torch on CPU). Read only, and only while no update is in progress."""
        if committed and self.fingerprint == committed and self.buffer is not None:
            return self.buffer
        return self._host

    def check_base(self, base: str, committed: str, version: int, manifest: Manifest) -> None:
        """Refuses a delta unless the spare holds the exact bytes of `base`, the committed version, in this layout."""
        if base != committed:
            held = f"version {version} ({committed})" if committed else "no committed version"
            raise BaseMismatch(f"delta against {base} refused: this rollout holds {held}; send a full version")
        if self.manifest is None or not same_layout(self.manifest, manifest):
            raise BaseMismatch("delta refused: its layout differs from the committed version's; send a full version")
        if self.buffer is None or self.fingerprint != base:
            raise BaseMismatch(
                "delta refused: this rollout holds no copy of its committed version's bytes (an earlier update "
                "was dropped, or the engine keeps none); send a full version"
            )

    def committed(
        self,
        staging: torch.Tensor,
        manifest: Manifest,
        returned: torch.Tensor | None,
        *,
        previous: str,
        fingerprint: str,
        base: str,
        changed: Sequence[np.ndarray | None],
    ) -> None:
        """Records a successful load of `staging` and starts bringing the returned buffer up to date.

        `previous` and `fingerprint` name the versions committed before and now; `base` is the
        update's delta base ("" for a full update) and `changed` what each tensor's patch replaced.
        """
        loaded, self._loaded, self.manifest = self._loaded, staging, manifest
        self.buffer, self.fingerprint, self._host = returned, "", None
        self._deltas = self._deltas or bool(base)
        if returned is None:
            return
        if _same_storage(returned, staging):
            self.fingerprint = fingerprint  # the engine copied out of it and reads it no more
            return
        self._host = staging
        if returned.numel() != staging.numel():
            return  # e.g. the engine's boot buffer: a rebuild allocates a spare that fits when a delta needs one
        held = previous if loaded is not None and _same_storage(returned, loaded) else ""
        # Started a moment later: the copy must not compete with the Commit answer still on its way out.
        if held and held == base:
            self._start_sync(staging, list(changed), fingerprint, delay=AFTER_COMMIT)
        elif self._deltas:
            self._start_sync(staging, None, fingerprint, delay=AFTER_COMMIT)

    def close(self) -> None:
        """Stops a background copy that has not started yet (shutdown)."""
        if self._sync is not None:
            self._sync.cancel()

    def forget(self) -> None:
        """The engine failed: nothing it held can serve as a base."""
        self.buffer, self.fingerprint, self._host = None, "", None

    async def settle(self, *, committed: str, rebuild: bool) -> None:
        """Waits for a background copy; with `rebuild`, first rebuilds a stale spare from the live copy.

        The rebuild (one full copy) is only needed after an update was dropped.
        """
        await self._wait()
        if rebuild and committed and self._host is not None and self.fingerprint != committed:
            self._start_sync(self._host, None, committed)
            await self._wait()

    async def _wait(self) -> None:
        if self._sync is not None:
            with contextlib.suppress(Exception):  # logged by the copy's done callback; the spare stays unknown
                await asyncio.shield(self._sync)

    def _start_sync(
        self, source: torch.Tensor, changed: list[np.ndarray | None] | None, fingerprint: str, delay: float = 0.0
    ) -> None:
        """Copies the committed bytes into the spare on a worker thread: only what changed, when known."""
        spare = self.buffer
        if spare is None or spare.numel() != source.numel():
            spare = self.buffer = self.engine.allocate_staging(source.numel())
        manifest = self.manifest
        assert manifest is not None
        self.fingerprint = ""

        def copy() -> None:
            if changed is None:
                spare.copy_(source)
                return
            src, dst = source.numpy(), spare.numpy()
            for entry, indices in zip(manifest, changed, strict=True):
                if indices is None:
                    dst[entry.offset : entry.end] = src[entry.offset : entry.end]
                else:
                    kind = f"<i{entry.dtype.itemsize}"
                    region = slice(entry.offset, entry.end)
                    copy_elements(dst[region].view(kind), src[region].view(kind), indices)

        def done(future: asyncio.Future[None]) -> None:
            if future.cancelled():
                return
            if future.exception() is not None:
                logger.warning("could not bring the delta base up to date: %r", future.exception())
            elif self.buffer is spare and self._host is source:
                self.fingerprint = fingerprint

        async def later() -> None:
            await asyncio.sleep(delay)
            await asyncio.get_running_loop().run_in_executor(None, copy)

        self._sync = asyncio.ensure_future(later())
        self._sync.add_done_callback(done)


def same_layout(a: Manifest, b: Manifest) -> bool:
    """Same names, dtypes, shapes and offsets in the same order: each is a byte-level base for the other."""
    return len(a) == len(b) and all(
        (x.name, x.dtype, x.shape, x.offset) == (y.name, y.dtype, y.shape, y.offset) for x, y in zip(a, b, strict=True)
    )


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.data_ptr() == b.data_ptr()
