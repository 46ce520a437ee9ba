"""LoRA adapter versions: the copy of the base they merge into, and the merge.

A rollout serves an adapter by merging it into the weights (weightsync/adapter.py: bit for bit PEFT's
merge) and swapping the merged version in like any full one, so the engine's atomic swap, gate and
tags apply unchanged and no LoRA kernels run. Each adapter version merges into the *base*, never into
the previous merge, so this keeps a private copy of the base's bytes: taken from the committed full
version the first time an adapter for it arrives (one copy of the model in host memory, kept while
adapters for that base keep coming), dropped when another full version commits. A rollout that holds
no such copy (it restarted, or the base it serves is another) refuses the adapter with
ADAPTER_BASE_MISMATCH, and the trainer pushes the base first. Which base and adapter serve is the
lifecycle's record (rollout_side/update/served.py), like every other fact about what is served.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from rollout_side.update.served import Served
from weightsync.adapter import AdapterConfig, merge_lora, split_name
from weightsync.errors import AdapterBaseMismatch
from weightsync.manifest import Manifest, tensor_bytes, tensor_checksum

__all__ = ["AdapterBase"]

logger = logging.getLogger(__name__)


class AdapterBase:
    """The copy of the base that LoRA adapters merge into."""

    def __init__(self) -> None:
        self.copied = ""  # the base whose exact bytes `buffer` holds
        self.manifest: Manifest | None = None  # that base's layout
        self.buffer: torch.Tensor | None = None

    def full_committed(self, fingerprint: str) -> None:
        """A full version now serves: it is the base from now on (pushing a full model drops the adapter)."""
        if self.copied != fingerprint:
            self.copied, self.manifest, self.buffer = "", None, None

    def wants_copy(self, config: AdapterConfig, served: Served) -> bool:
        """Whether to copy the committed version as the base of `config`: it is that base, served as pushed."""
        return (
            self.copied != config.base_fingerprint
            and not served.adapter_version
            and served.ready
            and (served.fingerprint == config.base_fingerprint)
        )

    async def keep(self, source: torch.Tensor, manifest: Manifest, fingerprint: str) -> None:
        """Copies the committed full version's bytes (off the event loop) as the base adapters merge into."""
        self.copied, self.buffer = "", None
        copy = await asyncio.to_thread(source.clone)
        self.copied, self.manifest, self.buffer = fingerprint, manifest, copy
        logger.info("kept a copy of base %s (%.1f MB) for LoRA adapters", fingerprint, copy.numel() / 1e6)

    def check(self, config: AdapterConfig, base: str) -> Manifest:
        """The base layout, if `config` names the base held; AdapterBaseMismatch if not (`base`: the one served)."""
        if self.manifest is None or self.buffer is None or self.copied != config.base_fingerprint:
            held = f"base {base}" if base else "no base model"
            if base == config.base_fingerprint:
                held += " but no copy of its bytes (it was not served as pushed)"
            raise AdapterBaseMismatch(
                f"adapter for base {config.base_fingerprint} refused: this rollout holds {held}; "
                "push that base model (a full version) first, then the adapter",
                metadata={"base_fingerprint": base},
            )
        return self.manifest

    def merge(self, config: AdapterConfig, adapter: Manifest, staged: torch.Tensor, into: torch.Tensor) -> Manifest:
        """Writes the base with the adapter (its bytes in `staged`, laid out as `adapter`) merged into `into`;
        returns the merged version's manifest (the base's, with the merged tensors' checksums), which the
        engine's read-back of the installed weights holds it to."""
        manifest = self.check(config, self.copied)
        assert self.buffer is not None
        into.copy_(self.buffer)
        weights = dict(manifest.views(into))
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for name, view in adapter.views(staged):
            module, which = split_name(name)
            factors.setdefault(module, {})[which] = view
        for module, pair in factors.items():
            weight = weights[f"{module}.weight"]
            weight.copy_(merge_lora(weight, pair["A"], pair["B"], config.scaling))
        merged = {f"{module}.weight" for module in factors}
        if manifest.piece_bytes:  # the combinable kind (a sharded push's): every checksum again, plainly
            merged, manifest = set(weights), manifest.with_piece_bytes(0)
        return manifest.with_checksums(
            [tensor_checksum(tensor_bytes(weights[e.name])) if e.name in merged else e.checksum for e in manifest]
        )
