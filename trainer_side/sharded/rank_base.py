"""One rank's delta base in a collective push: its own rows of the last version pushed, and who holds it.

Each rank keeps only the rows it sends (one more copy of its shards, not of the model), so a delta is
diffed where the rows are. Which rollouts confirmed the base is the same on every rank (every rank gets
the same results); whether every rank has a base of this layout is agreed on before each push.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

from trainer_side.push_result import PushResult
from trainer_side.sharded.delta import LocalDiff
from weightsync.delta import copy_elements, element_view
from weightsync.manifest import to_wire

__all__ = ["RankBase"]


class RankBase:
    """This rank's rows of the last version pushed (bf16, owned here) and the fingerprint each rollout confirmed."""

    def __init__(self) -> None:
        self.key: Hashable = None  # the layout and this rank's part of it, as the base was kept
        self.rows: dict[int, torch.Tensor] = {}  # tensor index -> this rank's rows
        self.fingerprint = ""
        self._held: dict[str, str] = {}  # rollout -> fingerprint it last confirmed

    def fits(self, key: Hashable) -> bool:
        return self.key is not None and self.key == key

    def holders(self, rollouts: Sequence[str]) -> list[str]:
        """The rollouts that last confirmed the base: they may get a delta."""
        return [a for a in rollouts if self.fingerprint and self._held.get(a) == self.fingerprint]

    def keep(self, key: Hashable, rows: Mapping[int, torch.Tensor], diffs: Mapping[int, LocalDiff]) -> None:
        """Makes `rows` (this rank's, of the version just pushed) the base. Into a base that fits, only the
        changed elements `diffs` found are copied (whole rows where none were diffed); otherwise rows the
        caller owns are copied and casts adopted."""
        fits = self.fits(key)
        self.key = None  # until done: a failure here leaves no base, never a half-written one
        kept: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for i, source in rows.items():
                new = to_wire(source)
                diff = diffs.get(i)
                if fits and i in self.rows:  # the same rows as before: written in place, no fresh pages
                    if diff is not None:
                        copy_elements(element_view(self.rows[i]), element_view(new), diff.indices - diff.offset)
                    else:
                        self.rows[i].copy_(new)
                    kept[i] = self.rows[i]
                elif new.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
                    kept[i] = new.clone()
                else:
                    kept[i] = new
        self.rows, self.key = kept, key

    def record(self, results: Sequence[PushResult]) -> None:
        """Takes a push's results: the base's fingerprint is what the rollouts committed, and who holds it."""
        for r in results:
            if r.ok:
                self._held[r.address] = r.fingerprint
                self.fingerprint = r.fingerprint
            else:
                self._held.pop(r.address, None)
        if not any(r.ok for r in results):
            self.fingerprint = ""

    def forget(self, rollout: str) -> None:
        self._held.pop(rollout, None)

    def reset(self) -> None:
        self.key, self.rows, self.fingerprint = None, {}, ""
        self._held.clear()
