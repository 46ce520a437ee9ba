"""Unit tests of weightsync.manifest: layout, checksums, fingerprints and what a state dict sends."""

from __future__ import annotations

import math
import re

import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightsync.errors import BadManifest
from weightsync.manifest import (
    CHECKSUM_PREFIX,
    Manifest,
    StreamingChecksums,
    TensorEntry,
    build_layout,
    build_manifest,
    manifest_of_state,
    tensor_bytes,
    tensor_checksum,
    wire_tensors,
)

FAST = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def tensor_of(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A tensor with arbitrary bit patterns (NaNs included), so bytes, not values, are compared."""
    numel = math.prod(shape)
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and tensor_bytes(a).tobytes() == tensor_bytes(b).tobytes()


def flat_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    raw = bytearray(b"".join(tensor_bytes(t).tobytes() for t in tensors))
    return torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)


shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple)
bf16_tensors = st.tuples(shapes, st.integers(0, 2**31)).map(lambda a: tensor_of(a[0], torch.bfloat16, a[1]))


# --- tensor_checksum / tensor_bytes -----------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\x00", b"abc", bytes(range(256)) * 40])
def test_tensor_checksum_is_prefixed_xxh3_128(data: bytes) -> None:
    expected = "xxh3_128:" + xxhash.xxh3_128_hexdigest(data)
    assert CHECKSUM_PREFIX == "xxh3_128:"
    assert tensor_checksum(data) == expected
    assert tensor_checksum(memoryview(data)) == expected
    assert re.fullmatch(r"xxh3_128:[0-9a-f]{32}", expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (), (1,), (3, 5), (2, 0, 4)])
def test_tensor_bytes_and_checksum_of_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = tensor_of(shape, dtype, 7)
    data = tensor_bytes(tensor)
    assert data.nbytes == math.prod(shape) * dtype.itemsize
    assert data.tobytes() == bytes(tensor.untyped_storage().tolist())  # tensor_of owns exactly its bytes
    assert tensor_checksum(data) == "xxh3_128:" + xxhash.xxh3_128_hexdigest(data.tobytes())


def test_checksum_distinguishes_one_bit() -> None:
    tensor = torch.zeros(64, dtype=torch.bfloat16)
    before = tensor_checksum(tensor_bytes(tensor))
    tensor.view(torch.uint8)[77] ^= 1
    assert tensor_checksum(tensor_bytes(tensor)) != before


# --- Manifest validation -----------------------------------------------------------------------------


def entry(
    name: str, shape: tuple[int, ...], offset: int, dtype: torch.dtype = torch.bfloat16, **kw: object
) -> TensorEntry:
    fields: dict[str, object] = {
        "name": name,
        "dtype": dtype,
        "shape": shape,
        "offset": offset,
        "byte_size": math.prod(shape) * dtype.itemsize,
        "checksum": "xxh3_128:" + "0" * 32,
    }
    fields.update(kw)
    return TensorEntry(**fields)  # type: ignore[arg-type]


def test_manifest_accepts_a_tiling() -> None:
    manifest = Manifest(entries=(entry("a", (2, 3), 0), entry("z", (0,), 12), entry("b", (4,), 12, torch.float32)))
    assert manifest.total_bytes == 28
    assert len(manifest) == 3
    assert [e.name for e in manifest] == ["a", "z", "b"]
    assert [e.end for e in manifest] == [12, 12, 28]


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param((entry("a", (2,), 0), entry("a", (2,), 4)), id="duplicate-name"),
        pytest.param((entry("a", (2,), 0, torch.float64),), id="float64"),
        pytest.param((entry("a", (2,), 0, torch.int32),), id="int32"),
        pytest.param((entry("a", (-1, 2), 0, byte_size=0),), id="negative-dimension"),
        pytest.param((entry("a", (2,), 0, byte_size=5),), id="byte-size"),
        pytest.param((entry("a", (2,), 1),), id="first-offset"),
        pytest.param((entry("a", (2,), 0), entry("b", (2,), 6)), id="gap"),
        pytest.param((entry("a", (2,), 0), entry("b", (2,), 2)), id="overlap"),
        pytest.param((entry("a", (2,), 0, checksum="0" * 32),), id="checksum-prefix"),
    ],
)
def test_manifest_rejects(entries: tuple[TensorEntry, ...]) -> None:
    with pytest.raises(BadManifest):
        Manifest(entries=entries)


# --- fingerprint -------------------------------------------------------------------------------------


def sample_tensors() -> list[tuple[str, torch.Tensor]]:
    return [
        ("model.embed.weight", tensor_of((3, 4), torch.bfloat16, 1)),
        ("model.norm.weight", tensor_of((4,), torch.bfloat16, 2)),
        ("model.layers.0.bias", tensor_of((1,), torch.bfloat16, 3)),
        ("model.layers.0.weight", tensor_of((2, 3), torch.bfloat16, 4)),
    ]


def test_fingerprint_format_and_stability() -> None:
    first = build_manifest(sample_tensors()).fingerprint
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", first)
    assert build_manifest(sample_tensors()).fingerprint == first
    assert Manifest(entries=()).fingerprint != first


@FAST
@given(
    tensors=st.lists(bf16_tensors, min_size=1, max_size=6),
    order=st.randoms(use_true_random=False),
)
def test_fingerprint_ignores_layout_order(tensors: list[torch.Tensor], order) -> None:  # type: ignore[no-untyped-def]
    named = [(f"t{i}", t) for i, t in enumerate(tensors)]
    shuffled = list(named)
    order.shuffle(shuffled)
    a, b = build_manifest(named), build_manifest(shuffled)
    assert [e.name for e in b] == [n for n, _ in shuffled]
    assert a.fingerprint == b.fingerprint


def test_fingerprint_ignores_layout_order_fixed() -> None:
    named = sample_tensors()
    reordered = build_manifest(list(reversed(named)))
    original = build_manifest(named)
    assert [e.offset for e in original] != [e.offset for e in reordered]
    assert original.fingerprint == reordered.fingerprint


def test_fingerprint_changes_with_every_element() -> None:
    named = sample_tensors()
    base = build_manifest(named).fingerprint
    seen = {base}
    for t, (_, tensor) in enumerate(named):
        for i in range(tensor.numel()):
            changed = [(n, x.clone()) for n, x in named]
            element = changed[t][1].view(-1)
            element[i] = 1.0 if element[i].item() != 1.0 else 2.0
            fingerprint = build_manifest(changed).fingerprint
            assert fingerprint not in seen, (t, i)
            seen.add(fingerprint)
    assert len(seen) == 1 + sum(x.numel() for _, x in named)


@pytest.mark.parametrize("which", range(4))
def test_fingerprint_changes_with_a_name(which: int) -> None:
    named = sample_tensors()
    renamed = [(n + ("_x" if i == which else ""), x) for i, (n, x) in enumerate(named)]
    assert build_manifest(renamed).fingerprint != build_manifest(named).fingerprint


@pytest.mark.parametrize("shape", [(12,), (4, 3), (2, 6), (1, 12), (12, 1), (2, 2, 3)])
def test_fingerprint_changes_with_a_shape(shape: tuple[int, ...]) -> None:
    named = sample_tensors()
    reshaped = [named[0][0], named[0][1].reshape(shape)]
    changed = [(reshaped[0], reshaped[1]), *named[1:]]
    a, b = build_manifest(named), build_manifest(changed)
    assert a.entries[0].checksum == b.entries[0].checksum  # same bytes
    assert a.fingerprint != b.fingerprint


def test_fingerprint_changes_with_dtype_on_same_bytes() -> None:
    tensor = tensor_of((8,), torch.bfloat16, 5)
    a = build_manifest([("w", tensor)])
    b = build_manifest([("w", tensor.view(torch.float16))])
    assert a.entries[0].checksum == b.entries[0].checksum
    assert a.fingerprint != b.fingerprint


def test_fingerprint_of_scalar_and_one_element_differ() -> None:
    scalar = tensor_of((), torch.bfloat16, 9)
    a = build_manifest([("w", scalar)]).fingerprint
    b = build_manifest([("w", scalar.reshape(1))]).fingerprint
    c = build_manifest([("w", scalar.reshape(1, 1))]).fingerprint
    assert len({a, b, c}) == 3


# --- build_manifest / wire_tensors / manifest_of_state -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_wire_tensors_cast_to_bf16(dtype: torch.dtype) -> None:
    source = torch.linspace(-3, 3, 12, dtype=torch.float32).reshape(3, 4).to(dtype)
    ((name, sent),) = list(wire_tensors({"w": source}))
    assert name == "w"
    assert sent.dtype == torch.bfloat16
    assert sent.is_contiguous() and sent.device.type == "cpu"
    assert torch.equal(sent, source.to(torch.bfloat16))
    (spec,) = manifest_of_state({"w": source}, piece_bytes=0).entries
    assert (spec.dtype, spec.shape, spec.byte_size) == (torch.bfloat16, (3, 4), 24)
    assert spec.checksum == tensor_checksum(tensor_bytes(source.to(torch.bfloat16)))


def test_wire_tensors_make_non_contiguous_contiguous() -> None:
    source = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    ((_, sent),) = list(wire_tensors({"w": source}))
    assert sent.is_contiguous() and sent.shape == (4, 3)
    assert torch.equal(sent, source.to(torch.bfloat16))


def test_wire_tensors_send_tied_tensors_once() -> None:
    embed = torch.randn(5, 4)
    state = {"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(4), "lm_head.weight": embed}
    sent = dict(wire_tensors(state))
    assert list(sent) == ["model.embed_tokens.weight", "model.norm.weight"]
    manifest = manifest_of_state(state)
    assert [e.name for e in manifest] == ["model.embed_tokens.weight", "model.norm.weight"]
    assert manifest.total_bytes == (20 + 4) * 2


def test_wire_tensors_tied_via_parameter_sharing() -> None:
    module = torch.nn.Sequential(torch.nn.Embedding(6, 3), torch.nn.Linear(3, 6, bias=False))
    module[1].weight = module[0].weight
    state = module.state_dict()
    assert list(state) == ["0.weight", "1.weight"]
    assert [name for name, _ in wire_tensors(state)] == ["0.weight"]


def test_wire_tensors_skip_non_float() -> None:
    state = {
        "position_ids": torch.arange(8),
        "w": torch.ones(2),
        "mask": torch.ones(3, dtype=torch.bool),
        "counts": torch.zeros(4, dtype=torch.int32),
        "bytes": torch.zeros(4, dtype=torch.uint8),
        "b": torch.zeros(3, dtype=torch.float16),
    }
    assert [name for name, _ in wire_tensors(state)] == ["b", "w"]  # in name order (the canonical layout)
    assert [e.name for e in manifest_of_state(state)] == ["b", "w"]


def test_the_layout_and_fingerprint_do_not_depend_on_the_state_dicts_order() -> None:
    """The combinable checksum depends on where a tensor sits: the layout is by name, whatever the order."""
    state = {"w": torch.randn(300_000), "b": torch.randn(700_000), "a": torch.randn(5)}
    reordered = dict(reversed(state.items()))
    assert manifest_of_state(state) == manifest_of_state(reordered)
    assert manifest_of_state(state).fingerprint == manifest_of_state(reordered).fingerprint


def test_distinct_tensors_equal_values_both_sent() -> None:
    state = {"a": torch.ones(3), "b": torch.ones(3)}
    assert [name for name, _ in wire_tensors(state)] == ["a", "b"]


def test_wire_tensors_keep_distinct_empty_tensors() -> None:
    state = {"a": torch.empty(0), "b": torch.empty(0, 3), "c": torch.ones(2)}
    assert [name for name, _ in wire_tensors(state)] == ["a", "b", "c"]


def test_wire_tensors_keep_overlapping_views_of_other_shape() -> None:
    weight = torch.randn(4, 3)
    state = {"w": weight, "w_row0": weight[0]}
    assert [name for name, _ in wire_tensors(state)] == ["w", "w_row0"]


@FAST
@given(st.lists(st.tuples(shapes, st.sampled_from(DTYPES), st.integers(0, 2**31)), max_size=6))
def test_views_of_flat_buffer_equal_originals(specs: list[tuple[tuple[int, ...], torch.dtype, int]]) -> None:
    state = {f"p{i}": tensor_of(*spec) for i, spec in enumerate(specs)}
    sent = dict(wire_tensors(state))
    manifest = build_manifest(sent.items())
    assert manifest == manifest_of_state(state, piece_bytes=0)
    flat = flat_of(list(sent.values()))
    assert flat.numel() == manifest.total_bytes
    views = dict(manifest.views(flat))
    assert list(views) == list(sent)
    for name, view in views.items():
        assert view.dtype == torch.bfloat16
        assert same_bits(view, state[name].to(torch.bfloat16))
        assert tensor_checksum(tensor_bytes(view)) == next(e.checksum for e in manifest if e.name == name)


def test_views_are_views_into_flat() -> None:
    tensors = [("a", torch.ones(2, 2, dtype=torch.bfloat16)), ("b", torch.full((3,), 2.0, dtype=torch.bfloat16))]
    manifest = build_manifest(tensors)
    flat = flat_of([t for _, t in tensors])
    views = dict(manifest.views(flat))
    assert torch.equal(views["a"], tensors[0][1]) and torch.equal(views["b"], tensors[1][1])
    views["b"].fill_(5.0)
    assert torch.equal(flat[8:], torch.full((3,), 5.0, dtype=torch.bfloat16).view(torch.uint8))
    assert torch.equal(views["a"], tensors[0][1])


@pytest.mark.parametrize(
    "dtypes",
    [
        pytest.param((torch.float32, torch.float16, torch.float32), id="f32-f16-f32"),
        pytest.param((torch.bfloat16, torch.bfloat16, torch.float32), id="bf16x2-f32"),
        pytest.param((torch.float32, torch.float32), id="f32-f32"),
    ],
)
def test_views_mixed_dtypes_aligned(dtypes: tuple[torch.dtype, ...]) -> None:
    tensors = [(f"t{i}", tensor_of((2,), d, i)) for i, d in enumerate(dtypes)]
    manifest = build_manifest(tensors)
    views = dict(manifest.views(flat_of([t for _, t in tensors])))
    assert all(same_bits(views[n], t) for n, t in tensors)


def test_views_mixed_dtypes_misaligned() -> None:
    tensors = [("h", tensor_of((1,), torch.float16, 1)), ("f", tensor_of((2,), torch.float32, 2))]
    manifest = build_manifest(tensors)
    assert manifest.entries[1].offset == 2
    views = dict(manifest.views(flat_of([t for _, t in tensors])))
    assert all(same_bits(views[n], t) for n, t in tensors)


@FAST
@given(
    shapes=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3), min_size=1, max_size=6),
    piece=st.integers(1, 200),
)
def test_streaming_checksums_equal_the_manifest_for_any_piece_size(shapes: list[list[int]], piece: int) -> None:
    """Fed the layout's bytes in pieces of any size (empty tensors included), the checksums are the manifest's."""
    named = [(f"t{i}", tensor_of(tuple(s), torch.bfloat16, i)) for i, s in enumerate(shapes)]
    layout = build_layout(named)
    sums = StreamingChecksums([e.byte_size for e in layout])
    flat = b"".join(tensor_bytes(t).tobytes() for _, t in named)
    for start in range(0, len(flat), piece):
        sums.update(memoryview(flat)[start : start + piece])
    assert sums.done
    assert layout.with_checksums(sums.checksums) == build_manifest(named)
    with pytest.raises(ValueError, match="more bytes"):
        sums.update(memoryview(b"x"))


def test_pending_manifest_has_no_fingerprint_and_must_be_completed_whole() -> None:
    named = [("a", tensor_of((3,), torch.bfloat16, 0)), ("b", tensor_of((2, 2), torch.bfloat16, 1))]
    layout = build_layout(named)
    assert layout.pending and not build_manifest(named).pending
    with pytest.raises(ValueError, match="no fingerprint yet"):
        _ = layout.fingerprint
    with pytest.raises(BadManifest, match="1 checksums for a manifest of 2"):
        layout.with_checksums([tensor_checksum(b"")])
    with pytest.raises(BadManifest, match="checksum must be"):
        layout.with_checksums([tensor_checksum(b""), ""])  # half pending is not a manifest
