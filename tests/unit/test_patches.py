"""Unit tests of delta sync: the patch format, the diff, transfer plans and assembling a delta in staging."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollout_side.update.staging import Router, Verifier
from weightsync import delta, wire
from weightsync.delta import BadPatch, Encoding, Transfer, TransferPlan
from weightsync.errors import BadManifest
from weightsync.manifest import build_manifest, tensor_bytes, tensor_checksum
from weightsync.v1 import weightsync_pb2 as pb


def _pair(numel: int, changed: float, dtype: torch.dtype = torch.bfloat16, seed: int = 0):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=gen).to(dtype)
    new = base.clone()
    picked = torch.randperm(numel, generator=gen)[: int(numel * changed)]
    new[picked] = torch.randn(len(picked), generator=gen).to(dtype)
    return base, new


def _bits(t: torch.Tensor) -> np.ndarray:
    return delta.element_view(t).copy()


def _applied(base: torch.Tensor, patch: bytes) -> torch.Tensor:
    out = base.clone()
    delta.apply_patch(delta.element_view(out), patch)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("numel", "changed"), [(1, 1.0), (1000, 0.0), (5000, 0.01), (200_000, 0.02), (70_000, 0.3)])
def test_patch_round_trip_is_bit_identical(dtype: torch.dtype, numel: int, changed: float) -> None:
    base, new = _pair(numel, changed, dtype)
    indices = delta.changed_indices(delta.element_view(new), delta.element_view(base))
    assert np.array_equal(indices, np.flatnonzero(_bits(new) != _bits(base)))
    patch = delta.encode_patch(indices, delta.element_view(new))
    assert np.array_equal(_bits(_applied(base, patch)), _bits(new))


def test_special_values_are_replaced_exactly() -> None:
    """-0.0 against 0.0, NaNs with different payloads and infinities: compared and copied as bits."""
    base = torch.zeros(1000, dtype=torch.bfloat16)
    raw = delta.element_view(base)
    raw[:8] = [0x0000, 0x7FC0, 0x7F80, 0x0001, 0x3F80, 0x7FC1, 0xFF80 - 0x10000, 0x1234]
    new = base.clone()
    nraw = delta.element_view(new)
    nraw[:8] = [0x8000 - 0x10000, 0x7FC1, 0xFF80 - 0x10000, 0x0001, 0x3F80, 0xFFC1 - 0x10000, 0xFF80 - 0x10000, 0x1234]
    result = delta.diff_tensor(new, base)
    assert result.indices is not None and result.indices.tolist() == [0, 1, 2, 5]
    assert result.patch is not None
    assert np.array_equal(_bits(_applied(base, result.patch)), _bits(new))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    numel=st.integers(1, 1 << 19),
    picks=st.lists(st.floats(0, 1, exclude_max=True), max_size=60),
    clustered=st.booleans(),
)
def test_any_index_set_round_trips(numel: int, picks: list[float], clustered: bool) -> None:
    """Gaps of every width and escapes (a gap of 2**19 needs 4-byte gaps or escapes)."""
    positions = sorted({int(p * (256 if clustered else numel)) % numel for p in picks})
    indices = np.array(positions, dtype=np.int64)
    base = torch.zeros(numel, dtype=torch.bfloat16)
    new = base.clone()
    delta.element_view(new)[indices] = np.arange(1, len(indices) + 1, dtype=np.int16)
    patch = delta.encode_patch(indices, delta.element_view(new))
    decoded, values = delta.decode_patch(patch, numel, 2)
    assert decoded.tolist() == positions
    assert np.array_equal(values, delta.element_view(new)[indices])
    assert np.array_equal(_bits(_applied(base, patch)), _bits(new))


def test_gap_width_follows_sparsity() -> None:
    dense_enough = np.arange(0, 10_000, 7, dtype=np.int64)
    sparse = np.arange(0, 10_000_000, 1000, dtype=np.int64)
    lonely = np.array([*range(0, 200, 2), 3_000_000], dtype=np.int64)
    values = np.zeros(10_000_001, dtype=np.int16)
    assert delta.encode_patch(dense_enough, values)[5] == 1
    assert delta.encode_patch(sparse, values)[5] == 2
    patch = delta.encode_patch(lonely, values)
    assert patch[5] == 1 and struct.unpack_from("<Q", patch, 16)[0] == 1  # one escape beats wider gaps


def test_diff_picks_full_when_a_patch_would_not_be_smaller() -> None:
    base, new = _pair(300_000, 0.9)
    result = delta.diff_tensor(new, base)
    assert result.patch is None and result.checksum == ""  # plainly dense: left to hash as it streams
    base, new = _pair(10, 0.5)  # tiny: the header alone outweighs it
    assert delta.diff_tensor(new, base).patch is None
    base, new = _pair(300_000, 0.01)
    result = delta.diff_tensor(new, base)
    assert result.patch is not None and len(result.patch) < 0.02 * new.numel() * 2
    assert result.checksum == tensor_checksum(tensor_bytes(new))
    assert delta.diff_tensor(new, None).patch is None
    assert delta.diff_tensor(new, base[:-1]).patch is None  # shapes differ: no base


def test_dense_sampling() -> None:
    base, new = _pair(1 << 20, 0.9)
    assert delta.likely_dense(delta.element_view(new), delta.element_view(base))
    base, new = _pair(1 << 20, 0.05)
    assert not delta.likely_dense(delta.element_view(new), delta.element_view(base))


def _valid_patch() -> tuple[torch.Tensor, bytes]:
    base = torch.zeros(1 << 17, dtype=torch.bfloat16)
    new = base.clone()
    delta.element_view(new)[[3, 4, 500, 100_000]] = [1, 2, 3, 4]
    indices = delta.changed_indices(delta.element_view(new), delta.element_view(base))
    return base, delta.encode_patch(indices, delta.element_view(new))


def _tamper(patch: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(patch)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


@pytest.mark.parametrize(
    ("fault", "text"),
    [
        (lambda p: p[:10], "shorter than its header"),
        (lambda p: b"XXXX" + p[4:], "bad magic"),
        (lambda p: _tamper(p, 4, "<B", 4), "4-byte elements"),
        (lambda p: _tamper(p, 5, "<B", 3), "gap width 3"),
        (lambda p: _tamper(p, 6, "<B", 2), "escape width 2"),
        (lambda p: _tamper(p, 7, "<B", 1), "bad magic"),
        (lambda p: _tamper(p, 8, "<Q", 1 << 40), "changes"),
        (lambda p: _tamper(p, 8, "<Q", 5), "header says"),
        (lambda p: p + b"\0", "header says"),
        (lambda p: p[:-1], "header says"),
        (lambda p: _tamper(p, 16, "<Q", 0), "header says"),
        (lambda p: _tamper(p, 24 + 4 * 2, "<B", 255), "3 saturated gaps but 2 escapes"),
        (lambda p: _tamper(p, len(p) - 4, "<I", 1 << 20), "escaped gap out of range"),
        (lambda p: _tamper(p, len(p) - 4, "<I", 7), "escaped gap out of range"),
        (lambda p: _tamper(p, len(p) - 4, "<I", 131_000), "outside"),
    ],
)
def test_malformed_patches_are_refused_without_writing(fault, text: str) -> None:  # type: ignore[no-untyped-def]
    base, patch = _valid_patch()
    target = base.clone()
    with pytest.raises(BadPatch, match=text):
        delta.apply_patch(delta.element_view(target), fault(patch))
    assert torch.equal(target.view(torch.int16), base.view(torch.int16))


def test_patch_for_another_tensor_size_is_refused() -> None:
    _, patch = _valid_patch()
    with pytest.raises(BadPatch, match="out of range"):
        delta.decode_patch(patch, 1000, 2)
    with pytest.raises(BadPatch, match="outside"):
        delta.decode_patch(patch, 100_000, 2)


def test_transfer_plans_tile_and_fit_the_manifest() -> None:
    tensors = [torch.zeros(100, dtype=torch.bfloat16), torch.zeros(50, dtype=torch.bfloat16)]
    manifest = build_manifest(zip(["a", "b"], tensors, strict=True))
    assert TransferPlan.full(manifest).total_bytes == manifest.total_bytes
    plan = TransferPlan.of_sizes([Encoding.PATCH, Encoding.FULL], [60, 100])
    plan.check_against(manifest)
    assert wire.plan_from_proto(wire.plan_to_proto(plan)) == plan
    with pytest.raises(BadPatch, match="expected 0"):
        TransferPlan((Transfer(Encoding.FULL, 4, 10),))
    with pytest.raises(BadPatch, match="FULL with 99 bytes"):
        TransferPlan.of_sizes([Encoding.FULL, Encoding.FULL], [99, 100]).check_against(manifest)
    with pytest.raises(BadPatch, match="patch for a 200-byte tensor"):
        TransferPlan.of_sizes([Encoding.PATCH, Encoding.FULL], [201, 100]).check_against(manifest)
    with pytest.raises(BadPatch, match="plan lists 1"):
        TransferPlan.of_sizes([Encoding.FULL], [200]).check_against(manifest)
    message = wire.plan_to_proto(plan)
    message.total_bytes += 1
    with pytest.raises(BadManifest, match="total_bytes"):
        wire.plan_from_proto(message)
    message = pb.TransferPlan(tensors=[pb.TensorTransfer(encoding=7, wire_bytes=4)], total_bytes=4)  # type: ignore[arg-type]
    with pytest.raises(BadManifest, match="unknown encoding"):
        wire.plan_from_proto(message)
    message = pb.TransferPlan(tensors=[pb.TensorTransfer(wire_offset=3, wire_bytes=4)], total_bytes=7)
    with pytest.raises(BadPatch, match="expected 0"):
        wire.plan_from_proto(message)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_wire_payloads_are_chunked_in_order(chunk: int) -> None:
    rng = random.Random(chunk)
    payloads = [memoryview(bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 5, 100])))) for _ in range(12)]
    pieces = [bytes(p) for _, chunk_pieces in wire.iter_wire_payloads(payloads, chunk) for p in chunk_pieces]
    assert b"".join(pieces) == b"".join(bytes(p) for p in payloads)
    sizes = [sum(p.nbytes for p in ps) for _, ps in wire.iter_wire_payloads(payloads, chunk)]
    assert all(s == chunk for s in sizes[:-1])


def _delta_update(seed: int):  # type: ignore[no-untyped-def]
    """A three-tensor version, its base, and the wire bytes and plan of a delta between them."""
    pairs = [_pair(40_000, 0.01, seed=seed), _pair(30, 1.0, seed=seed + 1), _pair(50_000, 0.002, seed=seed + 2)]
    new = [n for _, n in pairs]
    diffs = [delta.diff_tensor(n, b) for b, n in pairs]
    manifest = build_manifest(zip(["a", "b", "c"], new, strict=True))
    payloads = [memoryview(d.patch) if d.patch else tensor_bytes(n) for d, n in zip(diffs, new, strict=True)]
    plan = TransferPlan.of_sizes(
        [Encoding.PATCH if d.patch else Encoding.FULL for d in diffs], [p.nbytes for p in payloads]
    )
    base_flat = torch.cat([b.view(torch.uint8) for b, _ in pairs])
    new_flat = torch.cat([n.view(torch.uint8) for n in new])
    return manifest, plan, payloads, base_flat, new_flat, diffs


@pytest.mark.parametrize("chunk", [5, 1000, 1 << 20])
def test_router_and_verifier_assemble_a_delta_in_any_order(chunk: int) -> None:
    manifest, plan, payloads, base_flat, new_flat, diffs = _delta_update(chunk)
    assert [t.encoding for t in plan.transfers] == [Encoding.PATCH, Encoding.FULL, Encoding.PATCH]
    staging = base_flat.clone()
    patches = memoryview(bytearray(sum(t.wire_bytes for t in plan.transfers if t.encoding == Encoding.PATCH)))
    router = Router(manifest, plan, tensor_bytes(staging), patches)
    verifier = Verifier(manifest, tensor_bytes(staging), plan, patches)
    chunks = list(wire.iter_wire_payloads(payloads, chunk))
    random.Random(chunk).shuffle(chunks)
    for index, pieces in chunks:
        router.write(index * chunk, memoryview(b"".join(pieces)))
    verifier.feed(plan.total_bytes)
    assert verifier.mismatch is None, verifier.reason
    assert torch.equal(staging, new_flat)
    assert verifier.changed[1] is None
    assert np.array_equal(verifier.changed[0], diffs[0].indices)


def test_verifier_refuses_a_tampered_patch_and_a_wrong_base() -> None:
    manifest, plan, payloads, base_flat, _, _ = _delta_update(3)
    tampered = bytearray(payloads[0])
    tampered[delta.HEADER.size] ^= 1  # the first new value
    for staging, wire_payloads, reason in [
        (base_flat.clone(), [memoryview(bytes(tampered)), *payloads[1:]], "does not match its checksum"),
        (torch.zeros_like(base_flat), payloads, "does not match its checksum"),
        (base_flat.clone(), [memoryview(bytes(payloads[0])[:-1] + b"\xff"), *payloads[1:]], "malformed patch"),
    ]:
        patches = memoryview(bytearray(sum(t.wire_bytes for t in plan.transfers if t.encoding == Encoding.PATCH)))
        router = Router(manifest, plan, tensor_bytes(staging), patches)
        verifier = Verifier(manifest, tensor_bytes(staging), plan, patches)
        for index, pieces in wire.iter_wire_payloads(wire_payloads, 1 << 20):
            router.write(index, memoryview(b"".join(pieces)))
        verifier.feed(plan.total_bytes)
        assert verifier.mismatch == "a" and reason in verifier.reason
