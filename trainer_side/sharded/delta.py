"""Delta sync in a collective push: each rank diffs its own rows against its own base, and the ranks' parts
of a tensor's patch make one patch of weightsync/delta.py's format, so a rollout cannot tell it from a plain one.

A patch is a header, then the changed elements' values, their gaps and the escaped gaps, each section in
element order. Ranks hold rows in element order, so each rank's part of each section is one contiguous
byte range: the patch of a tensor split over R ranks is 1 + 3R spans of the delta's wire layout, and each
rank fills only its own. The rank holding the tensor's first row writes the header. To lay the patch
out, every rank needs a few numbers from every other (`Summary`: how many elements it changed, its first
and last changed index, how many of its own gaps each gap width would escape); with them gathered, every
rank computes the same plan (`plan_delta`) and its own offsets in it. Pure: no torch.distributed, no gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trainer_side.outgoing import Payloads, WirePayloads
from trainer_side.sharded.plan import Span
from weightsync.delta import HEADER, MAGIC, Encoding, TransferPlan, changed_indices, element_view, likely_dense
from weightsync.manifest import Manifest

__all__ = ["DeltaPayloads", "DeltaPlan", "LocalDiff", "Summary", "diff_rows", "plan_delta"]

_WIDTHS = (1, 2, 4)  # gap widths, as weightsync/delta.py picks among them
_ITEMSIZE = 2  # bf16 on the wire


@dataclass(frozen=True, slots=True)
class Summary:
    """What other ranks need to know of one rank's diff of its rows of one tensor."""

    count: int  # elements changed
    first: int  # first changed index in the whole tensor (-1: none)
    last: int
    escapes: tuple[int, int, int]  # its gaps after the first that would escape at gap widths 1, 2, 4
    wide: bool  # one of those gaps needs 8-byte escapes
    dense: bool  # a sample says most elements changed: the tensor goes in full


@dataclass(frozen=True, slots=True)
class LocalDiff:
    """One rank's changed elements of its rows: indices in the whole tensor, and their new bit patterns."""

    offset: int  # the whole tensor's index of this rank's first element
    indices: np.ndarray
    values: np.ndarray


def diff_rows(new: torch.Tensor, base: torch.Tensor, offset: int) -> tuple[Summary, LocalDiff | None]:
    """This rank's rows `new` (bf16, contiguous, CPU) against its base of them; `offset`: their first element."""
    data, old = element_view(new), element_view(base)
    if data.size and likely_dense(data, old):
        return Summary(0, -1, -1, (0, 0, 0), False, True), None
    local = changed_indices(data, old)
    indices = local + offset
    inner = np.diff(indices) - 1
    escapes = tuple(int(np.count_nonzero(inner >= _limit(w))) for w in _WIDTHS)
    wide = bool(inner.size) and int(inner.max()) >= 1 << 32
    first, last = (int(indices[0]), int(indices[-1])) if indices.size else (-1, -1)
    summary = Summary(int(indices.size), first, last, (escapes[0], escapes[1], escapes[2]), wide, False)
    return summary, LocalDiff(offset, indices, np.take(data, local))


@dataclass(frozen=True, slots=True)
class DeltaPlan:
    """The delta every rank agreed on: the transfer plan, its spans (which rank holds which wire bytes) and
    this rank's bytes of each patch."""

    plan: TransferPlan
    spans: list[Span]
    patches: dict[int, bytes]  # tensor -> this rank's header (if its), values, gaps and escapes

    @property
    def wire_bytes(self) -> int:
        return self.plan.total_bytes


def plan_delta(
    layout: Manifest,
    spans: Sequence[Span],
    summaries: Sequence[Mapping[int, Summary]],
    diffs: Mapping[int, LocalDiff],
    rank: int,
) -> DeltaPlan | None:
    """The patch layout from every rank's summaries (the same on every rank), or None if no tensor is worth one.

    `spans` are the full layout's (from `spans_of`); `summaries[r]` rank r's, by tensor; `diffs` this rank's."""
    by_tensor: dict[int, list[Span]] = {}
    for span in spans:
        by_tensor.setdefault(span.tensor, []).append(span)
    encodings: list[Encoding] = []
    sizes: list[int] = []
    wire_spans: list[Span] = []
    patches: dict[int, bytes] = {}
    wire = 0
    for i, entry in enumerate(layout):
        parts = by_tensor.get(i, [])
        shape = _patch_shape([summaries[s.rank][i] for s in parts], entry.byte_size)
        if shape is None:
            encodings.append(Encoding.FULL)
            sizes.append(entry.byte_size)
            shift = wire - entry.offset
            wire_spans.extend(Span(s.start + shift, s.end + shift, s.rank, i) for s in parts)
        else:
            encodings.append(Encoding.PATCH)
            sizes.append(shape.size)
            spans_i, mine = _patch_spans(shape, parts, [summaries[s.rank][i] for s in parts], wire, i, rank)
            wire_spans.extend(spans_i)
            if mine is not None:
                patches[i] = _patch_part(shape, mine[0], diffs.get(i), mine[1], header=mine[2])
        wire += sizes[-1]
    if Encoding.PATCH not in encodings:
        return None
    wire_spans.sort(key=lambda s: s.start)
    return DeltaPlan(TransferPlan.of_sizes(encodings, sizes), wire_spans, patches)


@dataclass(frozen=True, slots=True)
class _Shape:
    """A tensor's whole patch: sizes that every rank's part must agree on."""

    width: int
    escape_width: int
    count: int
    escapes: int
    size: int
    boundary: tuple[int, ...]  # each part's first gap (from the previous part's last change)


def _patch_shape(parts: Sequence[Summary], byte_size: int) -> _Shape | None:
    """Picks the gap width as weightsync/delta.py does; None if the tensor goes in full."""
    if not parts or any(p.dense for p in parts):
        return None
    boundary, last = [], -1
    for p in parts:
        boundary.append(p.first - last - 1 if p.count else -1)
        last = p.last if p.count else last
    count = sum(p.count for p in parts)
    wide = any(p.wide for p in parts) or any(b >= 1 << 32 for b in boundary)
    escape_width = 8 if wide else 4
    best: tuple[int, int, int] | None = None
    for k, width in enumerate(_WIDTHS):
        escapes = sum(p.escapes[k] for p in parts) + sum(b >= _limit(width) for b in boundary)
        size = count * width + escape_width * escapes
        if best is None or size < best[0]:
            best = (size, width, escapes)
        if not escapes:
            break
    assert best is not None
    _, width, escapes = best
    size = HEADER.size + count * (_ITEMSIZE + width) + escape_width * escapes
    if size >= byte_size:
        return None
    return _Shape(width, escape_width, count, escapes, size, tuple(boundary))


def _patch_spans(
    shape: _Shape, parts: Sequence[Span], summaries: Sequence[Summary], wire: int, tensor: int, rank: int
) -> tuple[list[Span], tuple[int, int, bool] | None]:
    """The spans of one tensor's patch at wire offset `wire`; and this rank's (part index, first gap, header)."""
    values_at = wire + HEADER.size
    gaps_at = values_at + shape.count * _ITEMSIZE
    escapes_at = gaps_at + shape.count * shape.width
    header_rank = parts[0].rank
    out = [Span(wire, values_at, header_rank, tensor)]
    mine = None
    before = escaped = 0
    for k, (span, summary) in enumerate(zip(parts, summaries, strict=True)):
        count, first_gap = summary.count, shape.boundary[k]
        own = summary.escapes[_WIDTHS.index(shape.width)] + (count > 0 and first_gap >= _limit(shape.width))
        at = HEADER.size if span.rank == header_rank and k == 0 else 0
        for start, size in (
            (values_at + before * _ITEMSIZE, count * _ITEMSIZE),
            (gaps_at + before * shape.width, count * shape.width),
            (escapes_at + escaped * shape.escape_width, own * shape.escape_width),
        ):
            if size:
                out.append(Span(start, start + size, span.rank, tensor, at))
            at += size
        if span.rank == rank:
            mine = (k, first_gap, k == 0)
        before += count
        escaped += own
    return out, mine


def _patch_part(shape: _Shape, part: int, diff: LocalDiff | None, first_gap: int, *, header: bool) -> bytes:
    """This rank's bytes of a patch: the header (if its part is the first), then its values, gaps, escapes."""
    out = [
        HEADER.pack(MAGIC, _ITEMSIZE, shape.width, shape.escape_width, 0, shape.count, shape.escapes) if header else b""
    ]
    if diff is not None and diff.indices.size:
        gaps = np.diff(diff.indices, prepend=diff.indices[0] - first_gap - 1) - 1
        limit = _limit(shape.width)
        out.append(diff.values.astype("<i2", copy=False).tobytes())
        out.append(np.minimum(gaps, limit).astype(f"<u{shape.width}").tobytes())
        out.append(gaps[gaps >= limit].astype(f"<u{shape.escape_width}").tobytes())
    return b"".join(out)


def _limit(width: int) -> int:
    return (1 << (8 * width)) - 1


class DeltaPayloads(Payloads):
    """This rank's payload of each tensor in a delta: its patch bytes, or its rows for a tensor sent in full."""

    def __init__(self, full: WirePayloads, patches: Mapping[int, bytes]) -> None:
        self._full = full
        self._patches = patches

    def __len__(self) -> int:
        return len(self._full)

    def payload(self, i: int) -> memoryview:
        patch = self._patches.get(i)
        return memoryview(patch) if patch is not None else self._full[i]
