"""Standalone mode: a rollout serves real weights from disk at boot, with no trainer (`serve --weights`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from rollout_side.engines.base import Engine, ParamSpec
from rollout_side.update.compat import check_manifest
from weightsync.checkpoint import load_checkpoint
from weightsync.manifest import Manifest, manifest_of_state

__all__ = ["boot_from_disk"]

logger = logging.getLogger(__name__)


async def boot_from_disk(engine: Engine, specs: Mapping[str, ParamSpec], weights: Path, version: int) -> Manifest:
    """Boots `engine` on the checkpoint `weights` served as `version`; returns the manifest it was sent as.

    The manifest is what a trainer would have announced for these weights, so the fingerprint a
    rollout reports for them equals the one a push of the same checkpoint would produce.

    The engine's weights are read back and held to that manifest before anything serves them.

    Raises:
        BadManifest: the checkpoint does not fit the model.
        InstalledMismatch: the engine does not hold what the checkpoint says (it then serves nothing).
    """
    manifest = manifest_of_state(load_checkpoint(weights))
    check_manifest(specs, manifest)
    await engine.start(weights, version)
    if engine.verify_installed:
        await engine.verify(manifest, version)
    logger.info("standalone: serving %s as version %d (%s)", weights, version, manifest.fingerprint)
    return manifest
