"""The combinable checksum kind, names as trainers write them, and the collective's byte plan (issue 15)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout_side.update.staging import Verifier
from trainer_side.base_store import BaseStore
from trainer_side.names import hf_name, renamed
from trainer_side.outgoing import Outgoing
from trainer_side.sharded.plan import Span, chunk_owners, spans_of
from trainer_side.version_file import VersionFileWriter
from weightsync import wire
from weightsync.errors import BadManifest
from weightsync.manifest import (
    PIECE_BYTES,
    build_layout,
    build_manifest,
    entry_checksum,
    manifest_of_state,
    piece_checksum,
    tensor_bytes,
)

BF16 = torch.bfloat16


def naive(tensors: list[torch.Tensor], g: int) -> list[str]:
    """The definition, spelled out: cut each tensor at every multiple of g in the flat layout."""
    out, offset = [], 0
    for t in tensors:
        data = bytes(tensor_bytes(t))
        cuts = [0, *(c - offset for c in range((offset // g + 1) * g, offset + len(data), g)), len(data)]
        digests = [xxhash.xxh3_64_intdigest(data[a:b]) for a, b in itertools.pairwise(cuts) if b > a]
        out.append(piece_checksum(g, digests))
        offset += len(data)
    return out


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6), g=st.sampled_from([2, 16, 64, 256]))
def test_piece_checksums_match_their_definition(sizes: list[int], g: int) -> None:
    tensors = [torch.randn(n).to(BF16) for n in sizes]
    manifest = build_manifest([(f"t{i}", t) for i, t in enumerate(tensors)], piece_bytes=g)
    assert [e.checksum for e in manifest] == naive(tensors, g)
    assert manifest.piece_bytes == g and manifest.entries[0].checksum.startswith(f"xxh3_128/{g}:")


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6), g=st.sampled_from([0, 2, 16, 256]))
def test_one_tensor_checksum_at_its_offset_matches_the_manifest(sizes: list[int], g: int) -> None:
    """What installed-weight verification hashes a read-back tensor with, one tensor at a time."""
    tensors = [torch.randn(n).to(BF16) for n in sizes]
    manifest = build_manifest([(f"t{i}", t) for i, t in enumerate(tensors)], piece_bytes=g)
    assert [entry_checksum(tensor_bytes(t), e.offset, g) for t, e in zip(tensors, manifest, strict=True)] == [
        e.checksum for e in manifest
    ]


@pytest.mark.parametrize("chunk", [64, 100, 1000])
def test_outgoing_chunks_reuse_chunk_hashes_and_complete_the_same_manifest(chunk: int) -> None:
    state = {f"t{i}": torch.randn(n).to(BF16) for i, n in enumerate([300, 7, 0, 512, 33])}
    outgoing = Outgoing.streamed(1, list(state.items()), piece_bytes=chunk)
    messages = list(outgoing.chunks("u", chunk))
    assert outgoing.manifest == manifest_of_state(state, piece_bytes=chunk)
    for message in messages:
        decoded = wire.decode_chunk(message)
        assert decoded.checksum == wire.chunk_checksum(decoded.data)


@pytest.mark.parametrize("with_digests", [True, False])
def test_verifier_checks_piece_checksums(with_digests: bool) -> None:
    state = {f"t{i}": torch.randn(n).to(BF16) for i, n in enumerate([300, 7, 512, 33])}
    chunk = 128
    manifest = manifest_of_state(state, piece_bytes=chunk)
    flat = torch.cat([t.view(torch.uint8).reshape(-1) for t in state.values()])
    verifier = Verifier(manifest, tensor_bytes(flat))
    if with_digests:  # what Incoming.take_chunk records for a rollout of this kind
        for i in range(wire.chunk_count(manifest.total_bytes, chunk)):
            a, b = wire.chunk_span(i, manifest.total_bytes, chunk)
            verifier.chunk_digests[a] = (b - a, wire.chunk_checksum(tensor_bytes(flat)[a:b]))
    verifier.feed(manifest.total_bytes)
    assert verifier.mismatch is None
    assert verifier.checksums == [e.checksum for e in manifest]
    flat[5] ^= 1
    tampered = Verifier(manifest, tensor_bytes(flat))
    tampered.feed(manifest.total_bytes)
    assert tampered.mismatch == "t0"


def test_manifest_refuses_a_checksum_of_the_other_kind() -> None:
    layout = build_layout([("a", torch.zeros(4, dtype=BF16))])
    plain = build_manifest([("a", torch.zeros(4, dtype=BF16))]).entries[0].checksum
    with pytest.raises(BadManifest):
        layout.with_piece_bytes(64).with_checksums([plain])
    with pytest.raises(BadManifest):
        layout.with_checksums([piece_checksum(64, [1])])


def test_manifest_piece_bytes_travel_in_the_proto() -> None:
    manifest = manifest_of_state({"a": torch.randn(40).to(BF16)}, piece_bytes=16)
    assert wire.manifest_from_proto(wire.manifest_to_proto(manifest)) == manifest
    assert manifest.fingerprint != manifest_of_state({"a": torch.randn(40).to(BF16)}).fingerprint


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("_orig_mod.model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
        ("model.layers.0._checkpoint_wrapped_module.mlp.weight", "model.layers.0.mlp.weight"),
        ("_fsdp_wrapped_module.model._fsdp_wrapped_module.norm.weight", "model.norm.weight"),
        ("model.orig_mod.x", "model.orig_mod.x"),
    ],
)
def test_wrapper_prefixes_are_stripped_anywhere(name: str, expected: str) -> None:
    assert hf_name(name) == expected


def test_rename_maps_names_and_refuses_collisions() -> None:
    assert list(renamed({"_orig_mod.a": 1}, lambda n: "x." + n)) == ["x.a"]
    with pytest.raises(ValueError, match="both named"):
        renamed({"_orig_mod.a": 1, "a": 2})


def test_spans_must_tile_the_layout_once() -> None:
    layout = build_layout([("a", torch.empty(4, 8, dtype=BF16)), ("b", torch.empty(3, dtype=BF16))])
    spans = spans_of(layout, [[(0, 0, 2), (1, 0, 3)], [(0, 2, 2)]])
    assert [(s.start, s.end, s.rank) for s in spans] == [(0, 32, 0), (32, 64, 1), (64, 70, 0)]
    with pytest.raises(RuntimeError, match="twice"):
        spans_of(layout, [[(0, 0, 3), (1, 0, 3)], [(0, 2, 2)]])
    with pytest.raises(RuntimeError, match="no rank"):
        spans_of(layout, [[(0, 0, 1), (1, 0, 3)], [(0, 2, 2)]])


def test_each_chunk_goes_out_from_the_rank_of_its_first_byte() -> None:
    spans = [Span(0, 50, 0, 0), Span(50, 100, 1, 0), Span(100, 110, 0, 1)]
    chunks = chunk_owners(spans, 110, 40)
    assert [[(p.start, p.end, p.span.rank) for p in c] for c in chunks] == [
        [(0, 40, 0)],
        [(40, 50, 0), (50, 80, 1)],
        [(80, 100, 1), (100, 110, 0)],
    ]


@pytest.mark.parametrize("g", [0, 64, 256])
def test_a_delta_diff_checksums_each_tensor_at_its_offset_in_the_layout(g: int) -> None:
    """The checksums a delta's diff computes (and its fallback for tensors it did not hash) are the kind
    `g` names, cut where the tensor sits in the flat layout: the manifest a full push of it would send."""
    base = {f"t{i}": torch.randn(n).to(BF16) for i, n in enumerate([300, 7, 0, 512, 33])}
    new = {k: v.clone() for k, v in base.items()}
    new["t3"][5] += 1  # sparse: a patch; the others unchanged
    store = BaseStore(g)
    try:
        store.assume(1, manifest_of_state(base, piece_bytes=g), base)
        manifest, diffs = store.scan(new)
    finally:
        store.close()
    assert diffs is not None and diffs[3].patch is not None
    assert manifest == manifest_of_state(new, piece_bytes=g)
    for tensor, entry in zip(new.values(), manifest, strict=True):
        assert entry_checksum(tensor_bytes(tensor), entry.offset, g) == entry.checksum, entry.name


def test_the_shared_memory_file_checksums_of_the_kind_announced(tmp_path: Path) -> None:
    state = {f"t{i}": torch.randn(n).to(BF16) for i, n in enumerate([300, 7, 0, 512])}
    writer = VersionFileWriter(tmp_path)
    try:
        payloads = [tensor_bytes(t) for t in state.values()]
        list(writer.blocks(payloads, [p.nbytes for p in payloads], checksum=True, piece_bytes=64))
        assert writer.checksums == [e.checksum for e in manifest_of_state(state, piece_bytes=64)]
    finally:
        writer.close()


def test_a_default_push_commits_the_fingerprint_manifest_of_state_gives_at_any_chunk_size() -> None:
    state = {f"t{i}": torch.randn(n).to(BF16) for i, n in enumerate([300_000, 7, 0, 700_000])}
    for chunk in (64 << 10, PIECE_BYTES):
        outgoing = Outgoing.streamed(1, list(state.items()), PIECE_BYTES)
        list(outgoing.chunks("u", chunk))
        assert outgoing.manifest is not None
        assert outgoing.manifest.fingerprint == manifest_of_state(state).fingerprint
