"""The trainer's delta base: the last version pushed, which rollouts hold it, and what to send each of them.

A push asks the store once what to send to whom (`prepare`) and tells it once that the push is over
(`finish`); what happens in between (diffs, checksums, writing the new base) is the store's business.

The base is the last version this publisher pushed, kept as bf16 tensors it owns: one copy for all
rollouts, not one per rollout. A rollout gets a delta only when the fingerprint it last confirmed is
the base's; every other rollout (new, restarted, behind, failed) gets the full version, never a
chain of patches. Each tensor is diffed once per push, whatever the number of rollouts.

Keeping the base costs one copy of the model in trainer memory, and, per push, writing the new
version into it. That write is cheap where it can be: after a delta only the changed elements are
copied; a tensor that was cast or moved to make it bf16 on the CPU is adopted, not copied (nothing
else holds it); only a tensor that *is* the caller's memory (bf16 CPU parameters, which the optimizer
updates in place) must be copied. The write runs on a worker thread while the chunks stream, and is
finished before `push` returns, because the caller may change its tensors from then on.

That full copy is the one cost a dense update (most elements changed) would add to a full sync, and
it pays off only if the next update is sparse. So after a dense update the publisher keeps no base
(a dense update is sent in full at the cost of a sampled diff only), and after the k-th dense update
in a row keeps none for the next 2**(k-1) - 1 pushes that would need a copy; a sparse update resets
this. One dense step among sparse ones thus costs one extra full push, no more. While no base is
kept, `reconcile` has no version to restore rollouts with; the next push restores them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from trainer_side.outgoing import Outgoing, wire_copies
from weightsync.delta import (
    Encoding,
    TensorDiff,
    TransferPlan,
    copy_elements,
    diff_tensor,
    element_view,
    likely_dense,
)
from weightsync.manifest import (
    Manifest,
    build_layout,
    build_manifest,
    entry_checksum,
    tensor_bytes,
)
from weightsync.memory import prefaulted_buffer

__all__ = ["BaseStore", "PushPlan"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PushPlan:
    """What one push sends to whom: `delta` to `holders`, `full` to every other rollout."""

    full: Outgoing
    delta: Outgoing | None = None
    holders: tuple[str, ...] = ()  # empty when there is no delta


class BaseStore:
    """The last version pushed (exact bf16 bytes, owned here) and the fingerprint each rollout confirmed."""

    def __init__(self, piece_bytes: int = 0) -> None:
        """`piece_bytes`: the checksum kind of the manifests made here (weightsync/manifest.py)."""
        self.piece_bytes = piece_bytes
        self.version = 0
        self.manifest: Manifest | None = None
        self._tensors: list[torch.Tensor] = []
        self._held: dict[str, str] = {}  # rollout -> fingerprint it last confirmed
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._storage: list[torch.Tensor] = []  # a dropped base's tensors, reused by the next one
        self._dense = 0  # dense updates in a row, seen by a diff
        self._skip = 0  # pushes left that keep no base, when keeping one needs a full copy

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint if self.manifest is not None and not self.manifest.pending else ""

    def holders(self, rollouts: Sequence[str]) -> list[str]:
        """The rollouts that last confirmed the base: they may get a delta."""
        return [a for a in rollouts if self.manifest is not None and self._held.get(a) == self.fingerprint]

    def confirm(self, rollout: str, fingerprint: str) -> None:
        self._held[rollout] = fingerprint

    def forget(self, rollout: str) -> None:
        """The rollout's state is unknown (a push to it failed): it gets a full version next."""
        self._held.pop(rollout, None)

    def prepare(self, state: Mapping[str, torch.Tensor], version: int, rollouts: Sequence[str]) -> PushPlan:
        """Plans the push of `state` as `version` to `rollouts`, and makes it the base (written while the
        chunks stream). Every `prepare` must be followed by `finish(plan)`, whatever the push's outcome."""
        tensors = wire_copies(state)  # a delta diffs whole tensors, and keeps them as the next base
        holders = self.holders(rollouts)
        if holders:
            manifest, diffs = self.scan(tensors)  # checksums and diffs in one pass
        else:
            manifest, diffs = self._layout(tensors), None  # checksummed as the chunks go out
        full = Outgoing.full(version, manifest, list(tensors.values()))
        delta = self._delta(full, diffs) if diffs is not None else None
        self._advance(version, manifest, tensors, diffs, state)
        return PushPlan(full, delta, tuple(holders) if delta is not None else ())

    def finish(self, plan: PushPlan) -> None:
        """Ends the push `plan` was made for: waits for the base to be written (the caller may change its
        tensors once the push returns) and keeps the checksums the push computed, if the base lacked them."""
        self._join()
        self._complete(plan.full)

    def assume(self, version: int, manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> None:
        """Makes `tensors` (kept as they are, not copied) the base, as `version` with `manifest`."""
        self._advance(version, manifest, tensors, None, {})
        self._join()

    def scan(self, tensors: Mapping[str, torch.Tensor]) -> tuple[Manifest, list[TensorDiff] | None]:
        """The new version's manifest and, if its layout is the base's, each tensor diffed against it.

        Checksums come out of the diff's pass over memory; without a usable base, or when no tensor is
        worth a patch (a dense update), the manifest's checksums are left pending for the push to compute.
        """
        self._join()
        if not self._fits(tensors):
            return self._layout(tensors), None
        new = list(tensors.values())
        # Plainly dense tensors are sent in full without a diff. Sampling them here, in one thread, is
        # ~1 ms for a 256 MiB model; through the pool below it was ~4 ms, 4% of a full sync's time.
        candidates = [i for i, (n, b) in enumerate(zip(new, self._tensors, strict=True)) if not _plainly_dense(n, b)]
        # Largest first over a few threads: numpy's compares and xxhash release the GIL (measured on 2 cores:
        # 72 ms -> 48 ms for a 256 MiB model); results stay in manifest order.
        order = sorted(candidates, key=lambda i: -new[i].numel())
        diffs: list[TensorDiff] = [TensorDiff("")] * len(new)
        if self._pool is None:  # kept: starting threads per push costs milliseconds
            workers = min(4, os.cpu_count() or 1)
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="weightsync-diff")
        layout, g = self._layout(tensors), self.piece_bytes
        offsets = [e.offset for e in layout]

        def diff(i: int) -> TensorDiff:
            return diff_tensor(new[i], self._tensors[i], offset=offsets[i], piece_bytes=g)

        for i, result in zip(order, self._pool.map(diff, order), strict=True):
            diffs[i] = result
        if not any(d.patch is not None for d in diffs):
            return layout, diffs  # sent in full: hashed as its chunks go out
        checksums = [
            d.checksum or entry_checksum(tensor_bytes(t), at, g) for d, t, at in zip(diffs, new, offsets, strict=True)
        ]
        return build_manifest(tensors.items(), checksums, piece_bytes=g), diffs

    def _layout(self, tensors: Mapping[str, torch.Tensor]) -> Manifest:
        """The layout of `tensors`, checksums pending, of this store's checksum kind."""
        return build_layout(tensors.items()).with_piece_bytes(self.piece_bytes)

    def _complete(self, outgoing: Outgoing) -> None:
        """Takes the checksums a push computed for a base kept with them pending; drops it if none did."""
        if self.manifest is None or not self.manifest.pending:
            return
        if outgoing.manifest is None:
            self.version, self.manifest, self._tensors = 0, None, []  # no rollout got it: no fingerprint to match
        else:
            self.manifest = outgoing.manifest

    def _delta(self, outgoing: Outgoing, diffs: Sequence[TensorDiff]) -> Outgoing | None:
        """The delta encoding of a full `outgoing` version, or None if no tensor got smaller as a patch."""
        if not any(d.patch is not None for d in diffs):
            return None
        payloads = tuple(
            memoryview(d.patch) if d.patch is not None else full
            for d, full in zip(diffs, outgoing.payloads, strict=True)
        )
        plan = TransferPlan.of_sizes(
            [Encoding.PATCH if d.patch is not None else Encoding.FULL for d in diffs], [p.nbytes for p in payloads]
        )
        return Outgoing(outgoing.version, outgoing.announced, payloads, plan=plan, base_fingerprint=self.fingerprint)

    def _advance(
        self,
        version: int,
        manifest: Manifest,
        tensors: Mapping[str, torch.Tensor],
        diffs: Sequence[TensorDiff] | None,
        sources: Mapping[str, torch.Tensor],
    ) -> None:
        """Makes this version the base: starts writing it on a worker thread (see `_join`).

        `sources` is the caller's state dict: wire tensors that share its memory are copied, the
        others adopted. Where a diff found the changed elements, only those are copied.
        """
        self._join()
        old = self._tensors if self._fits(tensors) else None
        jobs: list[tuple[torch.Tensor, torch.Tensor, np.ndarray | None]] = []
        kept: list[torch.Tensor] = []
        shared = [_shares_memory(t, sources.get(name)) for name, t in tensors.items()]
        copied = sum(_nbytes(t) for t, s in zip(tensors.values(), shared, strict=True) if s)
        if not self._worth_keeping(tensors, diffs, shared):
            # Keep the memory, though: writing fresh pages runs at 0.5-1 GB/s, and the next base needs it.
            self._storage = self._tensors or self._storage
            self.version, self.manifest, self._tensors = 0, None, []
            return
        storage = self._storage if old is None and _same_shapes(self._storage, tensors) else None
        self._storage = []
        fresh = _Fresh(copied if old is None and storage is None else 0, len(tensors))
        for i, tensor in enumerate(tensors.values()):
            diff = diffs[i] if diffs is not None else None
            if old is not None and diff is not None and diff.indices is not None:
                kept.append(old[i])
                jobs.append((old[i], tensor, diff.indices))
            elif not shared[i]:
                kept.append(tensor)  # made for the wire (cast, moved, made contiguous): nothing else holds it
            else:
                target = old[i] if old is not None else storage[i] if storage is not None else fresh.take(tensor)
                kept.append(target)
                jobs.append((target, tensor, None))
        self.version, self.manifest, self._tensors, self._error = version, manifest, kept, None
        self._writer = threading.Thread(target=self._write, args=(jobs,), name="weightsync-base", daemon=True)
        self._writer.start()

    def _worth_keeping(
        self, tensors: Mapping[str, torch.Tensor], diffs: Sequence[TensorDiff] | None, shared: Sequence[bool]
    ) -> bool:
        """False while recent updates were dense and keeping this one would copy whole tensors (see above)."""
        sizes = [_nbytes(t) for t in tensors.values()]
        if diffs is not None:
            full = sum(size for size, d in zip(sizes, diffs, strict=True) if d.patch is None)
            if 2 * full <= sum(sizes):
                self._dense = self._skip = 0  # sparse: keeping it costs only the changed elements
                return True
            self._dense += 1
            self._skip = (1 << min(self._dense - 1, 6)) - 1
            logger.info("a dense update: keeping no delta base for the next %d pushes that would copy", self._skip)
            return not any(shared)
        if not any(shared) or not self._skip:
            return True
        self._skip -= 1
        return False

    def _join(self) -> None:
        """Waits for the base to be written; a failed write drops the base (the next push is full)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join()
        if self._error is not None:
            logger.error("could not keep the delta base; the next push is a full one: %r", self._error)
            self.reset()

    def close(self) -> None:
        self._join()
        if self._pool is not None:
            self._pool.shutdown()

    def reset(self) -> None:
        self.version, self.manifest, self._tensors, self._error = 0, None, [], None
        self._held.clear()

    def tensors(self) -> list[torch.Tensor]:
        self._join()
        return list(self._tensors)

    def _write(self, jobs: Sequence[tuple[torch.Tensor, torch.Tensor, np.ndarray | None]]) -> None:
        try:
            with torch.no_grad():
                for target, source, indices in jobs:
                    if indices is None:
                        target.copy_(source)
                    else:
                        copy_elements(element_view(target), element_view(source), indices)
        except BaseException as error:  # noqa: BLE001 - reported by _join(), which drops the base
            self._error = error

    def _fits(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Whether `tensors` have the base's names, shapes and dtypes in the base's order."""
        manifest = self.manifest
        return (
            manifest is not None
            and len(manifest) == len(tensors)
            and all(
                (e.name, e.shape, e.dtype) == (n, tuple(t.shape), t.dtype)
                for e, (n, t) in zip(manifest, tensors.items(), strict=True)
            )
        )


class _Fresh:
    """Base tensors for a first version, carved from one pre-faulted buffer (fresh pages write at ~1 GB/s)."""

    def __init__(self, nbytes: int, count: int) -> None:
        self._flat = prefaulted_buffer(nbytes + 64 * count) if nbytes else None
        self._offset = 0

    def take(self, like: torch.Tensor) -> torch.Tensor:
        size = _nbytes(like)
        if self._flat is None or like.element_size() == 0 or self._offset % like.element_size():
            return torch.empty_like(like)
        view = self._flat[self._offset : self._offset + size].view(like.dtype).view(like.shape)
        self._offset += -(-size // 64) * 64  # aligned: the diff compares 8-byte words
        return view


def _plainly_dense(new: torch.Tensor, base: torch.Tensor) -> bool:
    return new.numel() > 0 and likely_dense(element_view(new), element_view(base))


def _same_shapes(storage: Sequence[torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> bool:
    return len(storage) == len(tensors) and all(
        (a.shape, a.dtype) == (b.shape, b.dtype) for a, b in zip(storage, tensors.values(), strict=True)
    )


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _shares_memory(tensor: torch.Tensor, source: torch.Tensor | None) -> bool:
    if source is None or source.device.type != "cpu":
        return False
    return tensor.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
