"""load_format="weightsync": vLLM's boot without random weights, taking a version pushed while it started.

vLLM's "dummy" format fills every weight with random values (4.4 s for 1 GiB on two cores) that nobody
may ever read: Generate is gated until a version is committed. This loader only zeroes them. If the
rollout has received and verified a version before vLLM reaches its load step, the rollout offers it
in a handoff file (path in `model_loader_extra_config["handoff"]`) and the loader reads it from the
shared-memory staging file, as a disk load would: the engine comes up serving it, with no swap
afterwards. The worker reports what it loaded (`booted_with`), so the rollout knows whether a swap is
still needed.

vLLM finds the format through weightsync's plugin (vllm_plugin.py, a `vllm.general_plugins` entry point),
which runs in every vLLM process, the EngineCore that loads the model included.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch

from rollout_side.engines.shm_staging import SHM_DIR, LayoutEntry, layout_views
from rollout_side.engines.vllm_prewarm import running
from weightsync import shm

__all__ = ["LOAD_FORMAT", "Handoff", "Offer", "booted_with", "register", "wanted"]

logger = logging.getLogger(__name__)

LOAD_FORMAT = "weightsync"
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "weightsync"
RANDOM_DUMMY_ENV = "WEIGHTSYNC_VLLM_RANDOM_DUMMY"

PENDING = "pending"
# How long the loader waits for an update being received: the receiver drops one no trainer feeds
# within seconds (and withdraws PENDING), so this only bounds a trainer that trickles for minutes.
PENDING_WAIT = 300.0

_booted_with: tuple[int, str] | None = None  # (version, staging path) this process's loader loaded
_registered = False


@dataclass(frozen=True, slots=True)
class Offer:
    """A verified version staged in a shared-memory file, offered to the engine's boot-time load."""

    version: int
    path: str
    nbytes: int
    layout: list[LayoutEntry]


class Handoff:
    """The file through which the rollout offers a version to a loader in another process.

    It holds an offer, or PENDING while an update is being received (the loader waits for it), or is
    absent. Written whole and renamed into place, so the loader reads one of those, never a part; held
    like a staging file (weightsync/shm.py), so a killed rollout's is swept by the next one.
    """

    def __init__(self, directory: Path = SHM_DIR) -> None:
        self.path = directory / f"weightsync-{os.getpid()}-{uuid.uuid4().hex[:12]}-handoff.json"
        self._fd = -1  # holds the file now at `path`

    def offer(self, offer: Offer) -> None:
        self._write([offer.version, offer.path, offer.nbytes, offer.layout])

    def expect(self) -> None:
        self._write([PENDING, os.getpid()])  # the owner: a loader stops waiting for a rollout that died

    def withdraw(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._let_go()

    def _write(self, value: object) -> None:
        fd = shm.replace(self.path, json.dumps(value).encode())
        self._let_go()
        self._fd = fd

    def _let_go(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_offer(path: str) -> Offer | None:
    """The offer at `path` once there is one; None if there is none. Waits while one is PENDING (an
    update arriving), up to PENDING_WAIT: the engine has nothing better to load meanwhile. Stops waiting
    if the rollout that wrote PENDING is gone (killed mid-boot): vLLM defers SIGTERM until its engine is
    built, so a loader waiting on would keep this process, and its memory, alive for PENDING_WAIT."""
    deadline = time.monotonic() + PENDING_WAIT
    while True:
        try:
            value = json.loads(Path(path).read_text())
        except FileNotFoundError:
            return None
        if value[0] != PENDING:
            version, staged, nbytes, layout = value
            return Offer(int(version), str(staged), int(nbytes), [tuple(entry) for entry in layout])
        if time.monotonic() > deadline or not running(int(value[1])):
            return None
        time.sleep(0.02)


def booted_with() -> tuple[int, str] | None:
    """What this process's loader loaded at boot: (version, staging path), or None (uninitialised)."""
    return _booted_with


def plugin_installed() -> bool:
    """Whether vLLM's processes will find the load format (the package is installed, not just on the path)."""
    return any(ep.name == PLUGIN_NAME for ep in entry_points(group=PLUGIN_GROUP))


def wanted() -> bool:
    """Whether a dummy boot uses this format: unless vLLM could not find it, or RANDOM_DUMMY_ENV=1 asks
    for vLLM's own random fill (bench.vllm_boot measures what skipping it saves)."""
    if os.environ.get(RANDOM_DUMMY_ENV) == "1":
        return False
    if not plugin_installed():
        logger.warning("weightsync is not pip-installed, so vLLM cannot find its loader: random dummy weights")
        return False
    return True


def register() -> None:
    """Registers the load format with vLLM (from the plugin, in every vLLM process); idempotent."""
    global _registered
    if _registered:
        return
    from vllm.logger import init_logger
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    log = init_logger("vllm.weightsync")  # under "vllm": its processes print only what reaches vLLM's handlers

    class WeightsyncLoader(BaseModelLoader):  # type: ignore[misc]
        """Allocates without initialising; loads the rollout's offered version if there is one."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.handoff = dict(load_config.model_loader_extra_config or {}).get("handoff")

        def download_model(self, model_config: Any) -> None:
            pass  # nothing on disk to fetch

        def load_weights(self, model: Any, model_config: Any) -> None:
            global _booted_with
            started = time.perf_counter()
            offer = read_offer(self.handoff) if self.handoff else None
            waited, started = time.perf_counter() - started, time.perf_counter()
            if offer is None:
                # Zeros, not random values (nothing reads them) and not garbage: vLLM's warm-up writes the
                # model's activations into KV-cache blocks, and a NaN left there poisons later requests'
                # attention (0 x NaN). On CPU, zeroing 1 GiB takes 0.07-0.25 s; the random fill took 4.4 s.
                for tensor in model.state_dict().values():
                    tensor.zero_()
                log.info(
                    "weightsync: weights zeroed in %.2f s; Generate is gated until a version is committed",
                    time.perf_counter() - started,
                )
                return
            flat = torch.from_file(offer.path, shared=True, size=offer.nbytes, dtype=torch.uint8)
            model.load_weights(weights=layout_views(flat, offer.layout))
            _booted_with = (offer.version, offer.path)
            seconds = time.perf_counter() - started
            log.info(
                "weightsync: loaded version %d at boot in %.2f s (after %.2f s waiting for it)",
                offer.version,
                seconds,
                waited,
            )

    register_model_loader(LOAD_FORMAT)(WeightsyncLoader)
    _registered = True
