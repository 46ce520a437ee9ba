"""Placement in a collective push: which rank holds which rows of each tensor, so which bytes of the
unsharded layout it sends (the chunk plan over those rows is trainer_side/sharded/plan.py).

A `Shard(0)` DTensor's rows stay where they are (FSDP2's default); a replicated or plain tensor is sent by
rank 0; other placements (`Shard(d>0)`, `Partial`, strided) are redistributed to `Shard(0)`, and a DTensor
on a mesh of more than one dimension is gathered whole, one tensor at a time. Every function here is one
rank's own view; the ranks agree on the results in trainer_side/sharded/collective.py.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from trainer_side.outgoing import WirePayloads
from trainer_side.sharded.plan import Piece, Span, chunk_owners, spans_of
from weightsync.manifest import Manifest, wire_layout

__all__ = ["Shards", "check_names", "layout_of", "local_rows", "shards_of", "sharded_sources"]

_EMPTY = torch.empty(0, dtype=torch.bfloat16)


@dataclass(frozen=True, slots=True)
class Shards:
    """What every rank knows of a state dict's layout, and this rank's part of it."""

    layout: Manifest
    local: dict[int, tuple[int, int, torch.Tensor]]  # tensor -> (first row, rows, this rank's rows)
    spans: list[Span]
    chunks: list[list[Piece]]
    payloads: WirePayloads
    key: Hashable  # what a delta base must have been kept for
    chunk_bytes: int


def shards_of(
    layout: Manifest,
    local: dict[int, tuple[int, int, torch.Tensor]],
    rows: Sequence[Sequence[tuple[int, int, int]]],
    rank: int,
    chunk_bytes: int,
) -> Shards:
    """The Shards of `layout`, given every rank's `rows` ((tensor, first row, count) of each it sends)."""
    spans = spans_of(layout, rows)
    chunks = chunk_owners(spans, layout.total_bytes, chunk_bytes)
    sources = [local[i][2] if i in local else _EMPTY for i in range(len(layout))]
    payloads = WirePayloads(sources, [e.name for e in layout])
    key = (tuple((e.name, e.shape) for e in layout), tuple(s for s in spans if s.rank == rank))
    return Shards(layout, local, spans, chunks, payloads, key, chunk_bytes)


def layout_of(
    state: Mapping[str, torch.Tensor], names: Sequence[str], rank: int
) -> tuple[Manifest, dict[int, tuple[int, int, torch.Tensor]]]:
    """The full layout (rank 0's choice of tensors) and this rank's (first row, rows, local tensor) of each."""
    local: dict[int, tuple[int, int, torch.Tensor]] = {}
    shapes = []
    for i, name in enumerate(names):
        tensor = state[name]
        shapes.append((name, torch.empty(tensor.shape, dtype=torch.bfloat16, device="meta")))
        held = local_rows(tensor, rank)
        if held is not None:
            local[i] = held
    return wire_layout(shapes), local


def local_rows(tensor: torch.Tensor, rank: int) -> tuple[int, int, torch.Tensor] | None:
    """This rank's contiguous rows of `tensor` (first row, count, the rows), or None if it sends none."""
    dim0 = tensor.shape[0] if tensor.dim() else 1
    if not isinstance(tensor, DTensor):
        return (0, dim0, tensor) if rank == 0 else None
    mesh = tensor.device_mesh
    if mesh.ndim != 1:  # gathered whole, one tensor at a time; rank 0 sends it
        full = tensor.full_tensor()
        return (0, dim0, full) if rank == 0 else None
    placement = tensor.placements[0]
    if placement.is_replicate():
        return (0, dim0, tensor.to_local()) if mesh.get_local_rank() == 0 else None
    if type(placement) is not Shard or placement.dim != 0 or not tensor.dim():
        tensor = tensor.redistribute(mesh, [Shard(0)])
    rows = tensor.to_local()
    _, offset = compute_local_shape_and_global_offset(tensor.shape, mesh, tensor.placements)
    return (offset[0], rows.shape[0], rows) if rows.shape[0] else None


def check_names(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
    missing = [n for n in names if n not in state]
    if missing:
        raise KeyError(f"this rank's state dict lacks {len(missing)} tensor(s) rank 0 has, e.g. {missing[0]!r}")


def sharded_sources(state: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The float tensors of a (possibly sharded) state dict that go on the wire; an alias (tied weights) once.

    Once also because the combinable checksum depends on where a tensor sits in the layout: two copies of
    tied bytes would carry different checksums, which a rollout that checks tied tensors refuses."""
    seen: set[tuple[object, ...]] = set()
    out = []
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        held = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if not held.numel():
            key: tuple[object, ...] = (id(tensor),)
        else:  # tied weights: two names (and, under FSDP2, two DTensors) over the same local storage
            key = (held.untyped_storage().data_ptr(), held.storage_offset(), held.shape, held.stride())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out.append((name, tensor))
    return sorted(out, key=lambda item: item[0])  # the layout `wire_sources` gives: the same fingerprint
