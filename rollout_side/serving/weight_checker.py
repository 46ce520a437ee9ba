"""vLLM's `/weight_checker` on a rollout: the installed weights' digests, and a comparison with a baseline.

vLLM's RL server (vllm/entrypoints/rl/online/api_router.py, `vllm serve` in dev mode) answers
POST /weight_checker {"action": "checksum"} with {"checksums": {key: digest}}, and {"action": "compare",
"baseline": {key: digest}} with {"match": bool, "mismatches": [key, ...]}: the sorted keys that either side
lacks or that differ. A rollout answers the same shapes, over the read-back its installed-weight
verification does (installed.py), so a tool written for vLLM's RL server can ask a rollout too.

What differs from vLLM, on purpose: keys are the trainer's tensor names (vLLM's are its own layer names per
worker, "dp0:pp0:pcp0:tp0:model.layers.0.self_attn.qkv_proj.weight"), and digests are the trainer's
checksums (xxh3, where vLLM hashes sha256), so the baseline can be the trainer's manifest as well as another
rollout's answer; where tensor-parallel workers disagree, each worker's digest is keyed "name@workerN".
Answers carry `weight_version` and `verified` (the read-back matched the committed version) too. vLLM's
third action, "reset" (zero every weight), is refused: a rollout serves only weights it can vouch for.
Like GetStatus(verify=true), a read-back that differs from the committed version withdraws it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rollout_side.engines.installed import Verification

__all__ = ["answer"]


def answer(verification: Verification, action: str, baseline: Mapping[str, str] | None) -> dict[str, Any]:
    """The body of vLLM's answer to `action` ("checksum" or "compare", checked before), from one read-back."""
    checksums = dict(verification.digests)
    if action == "checksum":
        return {"checksums": checksums, "verified": verification.ok}
    baseline = baseline or {}
    mismatches = sorted(key for key in checksums.keys() | baseline.keys() if checksums.get(key) != baseline.get(key))
    return {"match": not mismatches, "mismatches": mismatches, "verified": verification.ok}
