"""vLLM's /weight_checker answers from one read-back (pure): keys per tensor, "name@workerN" where workers differ."""

from __future__ import annotations

import time

import torch

from rollout_side.engines.installed import compare
from rollout_side.serving.weight_checker import answer
from weightsync.manifest import build_manifest


def test_workers_that_disagree_get_a_key_each_and_compare_names_them() -> None:
    manifest = build_manifest([("a", torch.ones(4, dtype=torch.bfloat16)), ("b", torch.zeros(4, dtype=torch.bfloat16))])
    a, b = (e.checksum for e in manifest)
    verification = compare(manifest, 7, [[a, b], [a, "xxh3_128:" + "0" * 32]], time.perf_counter())
    assert answer(verification, "checksum", None) == {
        "checksums": {"a": a, "b@worker0": b, "b@worker1": "xxh3_128:" + "0" * 32},
        "verified": False,
    }
    trainer = {e.name: e.checksum for e in manifest}
    compared = answer(verification, "compare", trainer)
    assert compared == {"match": False, "mismatches": ["b", "b@worker0", "b@worker1"], "verified": False}


def test_a_tensor_not_found_has_no_key() -> None:
    manifest = build_manifest([("a", torch.ones(4, dtype=torch.bfloat16)), ("b", torch.zeros(4, dtype=torch.bfloat16))])
    a = manifest.entries[0].checksum
    verification = compare(manifest, 1, [[a, ""]], time.perf_counter())
    assert answer(verification, "checksum", None)["checksums"] == {"a": a}
    assert answer(verification, "compare", {"a": a})["match"] is True  # vLLM's compare: the keys both sides hold
