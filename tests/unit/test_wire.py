"""Unit tests of weightsync.wire: the hand-written chunk codec, chunking and manifest <-> protobuf."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import xxhash
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from weightsync import wire
from weightsync.errors import BadManifest, ChunkCorrupt
from weightsync.manifest import Manifest, build_manifest, tensor_bytes
from weightsync.v1 import weightsync_pb2 as pb

U64 = 2**64 - 1
FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


# --- raw protobuf encoding, written independently of wire.py -------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def length_delimited(field: int, payload: bytes) -> bytes:
    return key(field, 2) + varint(len(payload)) + payload


def split(data: bytes, cuts: list[int]) -> list[memoryview]:
    """`data` as memoryview pieces cut at the given offsets (empty pieces included)."""
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    view = memoryview(data)
    return [view[a:b] for a, b in itertools.pairwise(bounds)]


def tensor_of(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A tensor with arbitrary bit patterns (NaNs included), so bytes, not values, are compared."""
    numel = math.prod(shape)
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


update_ids = st.one_of(st.just(""), st.text(max_size=40), st.uuids().map(str))
indices = st.one_of(st.sampled_from([0, 1, 127, 128, 16383, 16384, 2**32, 2**63 - 1, U64]), st.integers(0, U64))
payloads = st.binary(max_size=2048)
cut_lists = st.lists(st.integers(0, 4096), max_size=6)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
tensor_lists = st.lists(
    st.tuples(shapes, st.sampled_from(DTYPES), st.integers(0, 2**31)).map(lambda a: tensor_of(*a)),
    max_size=6,
)


def same_fields(chunk: wire.Chunk, message: pb.PushChunksRequest) -> None:
    assert chunk.update_id == message.update_id
    assert chunk.index == message.index
    assert chunk.checksum == message.checksum
    assert bytes(chunk.data) == message.data
    assert chunk.file_bytes == message.file_bytes


# --- encode_chunk / decode_chunk -------------------------------------------------------------------


@FAST
@given(update_id=update_ids, index=indices, payload=payloads, cuts=cut_lists)
def test_encode_decode_round_trip(update_id: str, index: int, payload: bytes, cuts: list[int]) -> None:
    pieces = split(payload, cuts)
    assert b"".join(pieces) == payload
    encoded = wire.encode_chunk(update_id.encode(), index, pieces)

    chunk = wire.decode_chunk(encoded)
    assert chunk.update_id == update_id
    assert chunk.index == index
    assert chunk.checksum == xxhash.xxh3_64_intdigest(payload) == wire.chunk_checksum(payload)
    assert bytes(chunk.data) == payload

    message = pb.PushChunksRequest.FromString(encoded)
    assert message.update_id == update_id
    assert message.index == index
    assert message.checksum == xxhash.xxh3_64_intdigest(payload)
    assert message.data == payload
    # proto3 omits default fields and writes the rest in field order, as encode_chunk does.
    assert encoded == message.SerializeToString(deterministic=True)
    assert encoded == pb.PushChunksRequest(
        update_id=update_id, index=index, checksum=xxhash.xxh3_64_intdigest(payload), data=payload
    ).SerializeToString(deterministic=True)


@pytest.mark.parametrize(
    ("update_id", "index", "payload"),
    [
        ("", 0, b""),
        ("u", 0, b""),
        ("", 1, b""),
        ("", 0, b"\x00"),
        ("a" * 200, 2**63 - 1, bytes(range(256)) * 3),
        ("é-☃-𝄞", U64, b"x" * 70000),
        ("u", 127, b"ab"),
        ("u", 128, b"ab"),
    ],
)
def test_encode_matches_generated_serializer(update_id: str, index: int, payload: bytes) -> None:
    pieces = [memoryview(payload)[: len(payload) // 2], memoryview(payload)[len(payload) // 2 :]]
    checksum = xxhash.xxh3_64_intdigest(payload)
    expected = pb.PushChunksRequest(update_id=update_id, index=index, checksum=checksum, data=payload)
    encoded = wire.encode_chunk(update_id.encode(), index, pieces)
    assert encoded == expected.SerializeToString()
    assert pb.PushChunksRequest.FromString(encoded) == expected
    same_fields(wire.decode_chunk(encoded), expected)


@FAST
@given(update_id=update_ids, file_bytes=indices)
def test_file_progress_matches_generated_serializer(update_id: str, file_bytes: int) -> None:
    expected = pb.PushChunksRequest(update_id=update_id, file_bytes=file_bytes)
    encoded = wire.encode_file_progress(update_id.encode(), file_bytes)
    assert encoded == expected.SerializeToString()
    chunk = wire.decode_chunk(encoded)
    assert (chunk.update_id, chunk.file_bytes, chunk.index, chunk.checksum, bytes(chunk.data)) == (
        update_id,
        file_bytes,
        0,
        0,
        b"",
    )


def test_encode_with_no_pieces_is_empty_payload() -> None:
    encoded = wire.encode_chunk(b"id", 3, [])
    chunk = wire.decode_chunk(encoded)
    assert (chunk.update_id, chunk.index, bytes(chunk.data)) == ("id", 3, b"")
    assert chunk.checksum == xxhash.xxh3_64_intdigest(b"")


@FAST
@given(update_id=update_ids, index=indices, checksum=st.integers(0, U64), payload=payloads)
def test_decode_generated_serialization(update_id: str, index: int, checksum: int, payload: bytes) -> None:
    message = pb.PushChunksRequest(update_id=update_id, index=index, checksum=checksum, data=payload)
    same_fields(wire.decode_chunk(message.SerializeToString()), message)


@FAST
@given(
    update_id=update_ids,
    index=indices,
    checksum=st.integers(0, U64),
    payload=payloads,
    order=st.permutations(range(4)),
    noise=st.lists(
        st.sampled_from(
            [
                pb.GetStatusResponse(received_bytes=7, detail="zz", model="m", weight_version=3),
                pb.GenerateRequest(temperature=0.5, seed=9, wait_for_version=True, top_p=0.25),
                pb.CommitResponse(weight_version=1, fingerprint="f", swap_seconds=1.5),
                pb.GenerateResponse(text="hello"),
                pb.GetStatusResponse(fingerprint="sha", update_id="u", receiving_version=4),
            ]
        ),
        max_size=3,
    ),
)
def test_decode_merged_partial_messages(
    update_id: str, index: int, checksum: int, payload: bytes, order: list[int], noise: list[object]
) -> None:
    """Fields in any order, interleaved with other messages' fields (numbers >= 5, or 1..4 with another wire type)."""
    parts = [
        pb.PushChunksRequest(update_id=update_id).SerializeToString(),
        pb.PushChunksRequest(index=index).SerializeToString(),
        pb.PushChunksRequest(checksum=checksum).SerializeToString(),
        pb.PushChunksRequest(data=payload).SerializeToString(),
    ]
    extra = [m.SerializeToString() for m in noise]  # type: ignore[attr-defined]
    pieces = [parts[i] for i in order]
    for n, blob in enumerate(extra):
        pieces.insert(n * 2 % (len(pieces) + 1), blob)
    raw = b"".join(pieces)
    message = pb.PushChunksRequest.FromString(raw)
    assert (message.update_id, message.index, message.checksum, message.data) == (update_id, index, checksum, payload)
    same_fields(wire.decode_chunk(raw), message)


# A field of a protobuf message: (field number, wire type, value), encoded independently of wire.py.
fields = st.one_of(
    st.tuples(st.integers(1, 5), st.just(0), st.integers(0, U64)),
    st.tuples(st.integers(1, 4), st.just(2), st.binary(max_size=64)),
    st.tuples(st.integers(1, 2**29 - 1), st.just(0), st.integers(0, U64)),
    st.tuples(st.integers(1, 2**29 - 1), st.just(1), st.binary(min_size=8, max_size=8)),
    st.tuples(st.integers(1, 2**29 - 1), st.just(2), st.binary(max_size=64)),
    st.tuples(st.integers(1, 2**29 - 1), st.just(5), st.binary(min_size=4, max_size=4)),
)


def encode_field(field: int, wire_type: int, value: int | bytes) -> bytes:
    if wire_type == 0:
        assert isinstance(value, int)
        return key(field, 0) + varint(value)
    assert isinstance(value, bytes)
    if wire_type == 2:
        return length_delimited(field, value)
    return key(field, wire_type) + value


@MANY
@given(st.lists(fields, max_size=12))
def test_decode_agrees_with_generated_parser(message_fields: list[tuple[int, int, int | bytes]]) -> None:
    """Any field sequence (repeats: last wins; wrong wire type for a known field: unknown) parses alike."""
    for field, wire_type, value in message_fields:
        # proto3 strings must be UTF-8 for the generated parser; decode_chunk is laxer (tested below).
        if field == 1 and wire_type == 2:
            assert isinstance(value, bytes)
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                assume(False)
    raw = b"".join(encode_field(*f) for f in message_fields)
    same_fields(wire.decode_chunk(raw), pb.PushChunksRequest.FromString(raw))


def test_decode_replaces_invalid_utf8_update_id() -> None:
    chunk = wire.decode_chunk(length_delimited(1, b"a\xffb") + length_delimited(4, b"xy"))
    assert chunk.update_id == "a\ufffdb"
    assert bytes(chunk.data) == b"xy"


def test_decode_last_field_wins() -> None:
    raw = length_delimited(4, b"first") + key(2, 0) + varint(5) + length_delimited(4, b"second") + key(2, 0) + varint(9)
    chunk = wire.decode_chunk(raw)
    assert (chunk.index, bytes(chunk.data)) == (9, b"second")


def test_decode_empty_message_is_all_defaults() -> None:
    chunk = wire.decode_chunk(b"")
    assert (chunk.update_id, chunk.index, chunk.checksum, chunk.data.nbytes) == ("", 0, 0, 0)


# --- zero copy ------------------------------------------------------------------------------------


def test_decoded_data_is_a_view_into_bytes() -> None:
    payload = bytes(range(256)) * 4
    encoded = wire.encode_chunk(b"update", 12, [memoryview(payload)])
    chunk = wire.decode_chunk(encoded)
    assert chunk.data.obj is encoded
    assert chunk.data.readonly
    assert chunk.data.nbytes == len(payload)
    assert chunk.data.tobytes() == payload
    with pytest.raises(TypeError):
        chunk.data[0] = 1


def test_decoded_data_aliases_a_mutable_buffer() -> None:
    payload = b"abcdefgh"
    buffer = bytearray(wire.encode_chunk(b"u", 1, [memoryview(payload)]))
    chunk = wire.decode_chunk(buffer)  # type: ignore[arg-type]
    assert chunk.data.obj is buffer
    start = len(buffer) - len(payload)
    buffer[start] = ord("Z")
    assert chunk.data.tobytes() == b"Zbcdefgh"


# --- hostile input --------------------------------------------------------------------------------


def decode_or_corrupt(raw: bytes) -> wire.Chunk | None:
    """decode_chunk's contract on any input: a Chunk viewing `raw`, or ChunkCorrupt."""
    try:
        chunk = wire.decode_chunk(raw)
    except ChunkCorrupt:
        return None
    assert isinstance(chunk, wire.Chunk)
    assert isinstance(chunk.update_id, str)
    assert 0 <= chunk.index
    assert 0 <= chunk.checksum
    assert chunk.data.nbytes <= len(raw)
    if chunk.data.nbytes:
        assert chunk.data.obj is raw
        assert chunk.data.tobytes() in raw
    return chunk


@pytest.mark.timeout(60)
@MANY
@given(st.binary(max_size=512))
def test_decode_random_bytes(raw: bytes) -> None:
    decode_or_corrupt(raw)


@pytest.mark.timeout(60)
@MANY
@given(
    prefix=st.lists(fields, max_size=4).map(lambda fs: b"".join(encode_field(*f) for f in fs)),
    garbage=st.binary(min_size=1, max_size=64),
)
def test_decode_valid_prefix_then_garbage(prefix: bytes, garbage: bytes) -> None:
    decode_or_corrupt(prefix + garbage)


@pytest.mark.parametrize(
    ("update_id", "index", "payload"),
    [("", 0, b"p"), ("update-1", 5, bytes(300)), ("x" * 130, U64, b"\x80" * 17)],
)
def test_decode_truncated_messages(update_id: str, index: int, payload: bytes) -> None:
    """Every prefix parses exactly as the generated parser parses it; cuts inside a field are corrupt."""
    encoded = wire.encode_chunk(update_id.encode(), index, [memoryview(payload)])
    data_tag = len(encoded) - len(payload) - len(varint(len(payload))) - 1
    assert encoded[data_tag] == 0x22
    for cut in range(len(encoded)):
        prefix = encoded[:cut]
        try:
            expected = pb.PushChunksRequest.FromString(prefix)
        except DecodeError:
            expected = None
        if expected is None:
            with pytest.raises(ChunkCorrupt):
                wire.decode_chunk(prefix)
        else:
            same_fields(wire.decode_chunk(prefix), expected)
        if cut > data_tag:  # inside the data field, which is last: never a valid message
            assert expected is None


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(key(4, 2) + varint(100) + b"x" * 10, id="data-length-overruns"),
        pytest.param(key(1, 2) + varint(5) + b"abcd", id="update-id-length-overruns-by-one"),
        pytest.param(key(9, 2) + varint(2**63) + b"x", id="unknown-field-huge-length"),
        pytest.param(key(4, 2) + varint(U64), id="data-length-u64-max"),
        pytest.param(key(4, 2), id="missing-length"),
        pytest.param(key(2, 0), id="missing-varint"),
        pytest.param(key(2, 0) + b"\x80\x80", id="unterminated-varint"),
        pytest.param(key(2, 0) + b"\xff" * 10 + b"\x01", id="eleven-byte-varint"),
        pytest.param(key(2, 0) + b"\x80" * 10 + b"\x00", id="eleven-byte-varint-zero"),
        pytest.param(b"\xff" * 11 + b"\x01", id="overlong-key"),
        pytest.param(key(4, 2) + b"\xff" * 20, id="overlong-length"),
        pytest.param(key(7, 1) + b"1234567", id="fixed64-truncated"),
        pytest.param(key(7, 5) + b"123", id="fixed32-truncated"),
        pytest.param(key(2, 6) + b"\x00", id="wire-type-6"),
        pytest.param(key(4, 7) + b"\x00", id="wire-type-7"),
        pytest.param(key(5, 3), id="unterminated-group"),
        pytest.param(key(5, 4), id="stray-end-group"),
        pytest.param(pb.PushChunksRequest(index=3, data=b"abc").SerializeToString()[:-1], id="truncated-data"),
    ],
)
def test_decode_malformed_is_chunk_corrupt(raw: bytes) -> None:
    with pytest.raises(DecodeError):  # the generated parser rejects it too (sanity check)
        pb.PushChunksRequest.FromString(raw)
    with pytest.raises(ChunkCorrupt):
        wire.decode_chunk(raw)


@pytest.mark.timeout(20)
def test_decode_large_hostile_input_terminates() -> None:
    many_fields = (key(7, 0) + b"\x01") * 200_000 + key(4, 2) + varint(3) + b"end"
    chunk = wire.decode_chunk(many_fields)
    assert bytes(chunk.data) == b"end"
    with pytest.raises(ChunkCorrupt):
        wire.decode_chunk(many_fields + key(4, 2) + varint(10**9))


def test_decode_ten_byte_varint_wraps_like_protobuf() -> None:
    raw = key(2, 0) + b"\xff" * 9 + b"\x7f" + key(3, 0) + b"\x80" * 9 + b"\x02"
    expected = pb.PushChunksRequest.FromString(raw)
    assert (expected.index, expected.checksum) == (U64, 0)
    chunk = wire.decode_chunk(raw)
    assert (chunk.index, chunk.checksum) == (expected.index, expected.checksum)


def test_decode_refuses_deprecated_groups() -> None:
    group = key(9, 3) + key(1, 0) + varint(5) + key(9, 4)
    raw = pb.PushChunksRequest(index=4, data=b"abc").SerializeToString() + group
    with pytest.raises(ChunkCorrupt, match="wire type 3"):
        wire.decode_chunk(raw)


# --- chunking ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "chunk_bytes", "count"),
    [
        (0, 1, 0),
        (0, 7, 0),
        (1, 1, 1),
        (1, 100, 1),
        (10, 3, 4),
        (9, 3, 3),
        (10, 10, 1),
        (11, 10, 2),
        (2**40, 2**20, 2**20),
    ],
)
def test_chunk_count(total: int, chunk_bytes: int, count: int) -> None:
    assert wire.chunk_count(total, chunk_bytes) == count


@FAST
@given(total=st.integers(0, 20_000), chunk_bytes=st.integers(1, 30_000))
def test_chunk_spans_tile_the_layout(total: int, chunk_bytes: int) -> None:
    count = wire.chunk_count(total, chunk_bytes)
    spans = [wire.chunk_span(i, total, chunk_bytes) for i in range(count)]
    assert sum(end - start for start, end in spans) == total
    assert all(spans[i][1] == spans[i + 1][0] for i in range(count - 1))
    assert all(end - start == chunk_bytes for start, end in spans[:-1])
    if count:
        assert spans[0][0] == 0
        assert spans[-1][1] == total
        assert 0 < spans[-1][1] - spans[-1][0] <= chunk_bytes


def check_chunking(tensors: list[torch.Tensor], chunk_bytes: int) -> None:
    manifest = build_manifest((f"t{i}", t) for i, t in enumerate(tensors))
    everything = b"".join(tensor_bytes(t).tobytes() for t in tensors)
    assert manifest.total_bytes == len(everything)
    count = wire.chunk_count(manifest.total_bytes, chunk_bytes)
    chunks = list(wire.iter_wire_payloads([tensor_bytes(t) for t in tensors], chunk_bytes))
    assert [index for index, _ in chunks] == list(range(count))
    joined = []
    for index, pieces in chunks:
        assert all(isinstance(p, memoryview) and p.nbytes > 0 for p in pieces)
        start, end = wire.chunk_span(index, manifest.total_bytes, chunk_bytes)
        data = b"".join(pieces)
        assert data == everything[start:end]
        if index < count - 1:
            assert len(data) == chunk_bytes
        else:
            assert 0 < len(data) <= chunk_bytes
        # Each chunk survives the codec byte for byte.
        chunk = wire.decode_chunk(wire.encode_chunk(b"u", index, pieces))
        assert chunk.index == index and bytes(chunk.data) == data
        assert chunk.checksum == wire.chunk_checksum(data)
        joined.append(data)
    assert b"".join(joined) == everything


@FAST
@given(tensors=tensor_lists, chunk_bytes=st.integers(1, 600))
def test_iter_wire_payloads_reproduces_layout(tensors: list[torch.Tensor], chunk_bytes: int) -> None:
    check_chunking(tensors, chunk_bytes)


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 7, 64, 115, 116, 117, 10_000])
def test_iter_wire_payloads_fixed_cases(chunk_bytes: int) -> None:
    tensors = [
        tensor_of((0,), torch.bfloat16, 1),
        tensor_of((1,), torch.bfloat16, 2),
        tensor_of((3, 0, 2), torch.bfloat16, 3),
        tensor_of((), torch.float32, 4),
        tensor_of((5, 7), torch.bfloat16, 5),
        tensor_of((3,), torch.float16, 6),
        tensor_of((2, 0), torch.float32, 7),
    ]
    assert sum(t.numel() * t.element_size() for t in tensors) == 82
    check_chunking(tensors, chunk_bytes)


def test_iter_wire_payloads_empty_layouts() -> None:
    assert list(wire.iter_wire_payloads([], 4)) == []
    empty = [torch.empty(0, dtype=torch.bfloat16), torch.empty(2, 0, dtype=torch.bfloat16)]
    assert list(wire.iter_wire_payloads([tensor_bytes(t) for t in empty], 4)) == []


def test_iter_wire_payloads_is_zero_copy() -> None:
    tensor = torch.zeros(8, dtype=torch.bfloat16)
    ((_, pieces),) = list(wire.iter_wire_payloads([tensor_bytes(tensor)], 16))
    tensor.fill_(1.0)
    assert b"".join(pieces) == tensor_bytes(tensor).tobytes() != bytes(16)


# --- manifests on the wire ---------------------------------------------------------------------------


def named(tensors: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(f"layer.{i}.weight", t) for i, t in enumerate(tensors)]


@FAST
@given(tensors=tensor_lists)
def test_manifest_proto_round_trip(tensors: list[torch.Tensor]) -> None:
    manifest = build_manifest(named(tensors))
    message = wire.manifest_to_proto(manifest)
    assert message.total_bytes == manifest.total_bytes
    assert [s.name for s in message.tensors] == [e.name for e in manifest]
    assert [tuple(s.shape) for s in message.tensors] == [e.shape for e in manifest]
    reparsed = pb.Manifest.FromString(message.SerializeToString())
    back = wire.manifest_from_proto(reparsed)
    assert back == manifest
    assert back.fingerprint == manifest.fingerprint


@pytest.mark.parametrize(
    ("dtype", "element_type"),
    [
        (torch.bfloat16, pb.ELEMENT_TYPE_BFLOAT16),
        (torch.float16, pb.ELEMENT_TYPE_FLOAT16),
        (torch.float32, pb.ELEMENT_TYPE_FLOAT32),
    ],
)
def test_manifest_proto_element_types(dtype: torch.dtype, element_type: int) -> None:
    manifest = build_manifest([("w", torch.ones(2, 3, dtype=dtype))])
    (spec,) = wire.manifest_to_proto(manifest).tensors
    assert spec.dtype == element_type
    assert spec.byte_size == 6 * dtype.itemsize
    assert wire.manifest_from_proto(wire.manifest_to_proto(manifest)).entries[0].dtype == dtype


def valid_proto() -> pb.Manifest:
    tensors = [
        ("a", torch.ones(2, 3, dtype=torch.bfloat16)),
        ("b", torch.ones(4, dtype=torch.bfloat16)),
        ("c", torch.ones(1, 1, dtype=torch.bfloat16)),
    ]
    return wire.manifest_to_proto(build_manifest(tensors))


def _set(index: int, **changes: object):  # type: ignore[no-untyped-def]
    def mutate(message: pb.Manifest) -> None:
        for name, value in changes.items():
            spec = message.tensors[index]
            if name == "shape":
                del spec.shape[:]
                spec.shape.extend(value)  # type: ignore[call-overload]
            else:
                setattr(spec, name, value)

    return mutate


def _shift_after(index: int, delta: int):  # type: ignore[no-untyped-def]
    def mutate(message: pb.Manifest) -> None:
        for spec in message.tensors[index:]:
            spec.offset += delta
        message.total_bytes += delta

    return mutate


def _swap_layout(message: pb.Manifest) -> None:
    message.tensors[0].offset, message.tensors[1].offset = message.tensors[1].offset, message.tensors[0].offset


def _duplicate_name(message: pb.Manifest) -> None:
    message.tensors[2].name = "a"


def _total(delta: int):  # type: ignore[no-untyped-def]
    def mutate(message: pb.Manifest) -> None:
        message.total_bytes += delta

    return mutate


def _drop_total(message: pb.Manifest) -> None:
    message.ClearField("total_bytes")


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(_set(0, dtype=pb.ELEMENT_TYPE_UNSPECIFIED), id="element-type-0"),
        pytest.param(_set(1, dtype=99), id="element-type-unknown"),
        pytest.param(_shift_after(1, 2), id="gap"),
        pytest.param(_shift_after(2, -2), id="overlap"),
        pytest.param(_set(0, offset=2), id="first-not-at-zero"),
        pytest.param(_swap_layout, id="offsets-out-of-order"),
        pytest.param(_set(1, byte_size=6), id="byte-size-too-small"),
        pytest.param(_set(1, byte_size=10), id="byte-size-too-large"),
        pytest.param(_set(0, shape=[3, 3]), id="shape-mismatch"),
        pytest.param(_set(2, shape=[1, 0]), id="zero-size-shape"),
        pytest.param(_duplicate_name, id="duplicate-name"),
        pytest.param(_total(1), id="total-too-large"),
        pytest.param(_total(-1), id="total-too-small"),
        pytest.param(_drop_total, id="total-missing"),
        pytest.param(_set(1, checksum="0123456789abcdef0123456789abcdef"), id="checksum-no-prefix"),
        pytest.param(_set(1, checksum="xxh3_64:0123456789abcdef"), id="checksum-other-prefix"),
        pytest.param(_set(1, checksum=""), id="checksum-empty"),
    ],
)
def test_manifest_from_proto_rejects(mutate) -> None:  # type: ignore[no-untyped-def]
    message = valid_proto()
    assert isinstance(wire.manifest_from_proto(message), Manifest)  # the unmutated one is fine
    mutate(message)
    with pytest.raises(BadManifest):
        wire.manifest_from_proto(message)


def test_manifest_from_proto_empty() -> None:
    manifest = wire.manifest_from_proto(pb.Manifest())
    assert len(manifest) == 0 and manifest.total_bytes == 0
    with pytest.raises(BadManifest):
        wire.manifest_from_proto(pb.Manifest(total_bytes=1))
