"""vLLM's side of a swap: the worker extension that maps a staging file (shm_staging.py) into the model."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from rollout_side.engines import installed
from rollout_side.engines.shm_staging import LayoutEntry, layout_views

__all__ = ["WeightsyncWorkerExtension"]

logger = logging.getLogger(__name__)


class WeightsyncWorkerExtension:
    """Mixed into vLLM's worker class (engine arg `worker_extension_cls`); called by `collective_rpc`.

    The tensors never travel through the RPC: the engine passes the path of a /dev/shm file it staged
    the version in, and each worker maps that file and hands typed views of it (Hugging Face names)
    to vLLM's in-place weight reload.
    """

    # Set by vLLM's worker; declared here for type checkers.
    model_runner: Any

    _weightsync_map: tuple[str, int, torch.Tensor] | None = None
    _weightsync_failpoints: installed.Failpoints | None = None  # tests only: read at the first load

    def weightsync_load(self, path: str, nbytes: int, layout: list[LayoutEntry]) -> int:
        """Copies every tensor in `layout` from the shared file into the model; returns how many.

        Goes through vLLM's in-place reload rather than `model.load_weights` alone: backends repack
        weights after loading (the CPU backend moves linear weights into oneDNN handles and leaves
        empty parameters behind), and the reload restores checkpoint format layer by layer, loads
        through the model's own name mapping (fused qkv / gate_up, tied embeddings), then repacks.
        """
        started = time.perf_counter()
        flat = self._weightsync_flat(path, nbytes)
        if self._weightsync_failpoints is None:
            self._weightsync_failpoints = installed.Failpoints.from_environ()
        faults = self._weightsync_failpoints
        skipped = faults.skipped([entry[0] for entry in layout])
        layout = [entry for entry in layout if entry[0] != skipped]
        self.model_runner.reload_weights(weights_iterator=layout_views(flat, layout), is_checkpoint_format=True)
        if (corrupted := faults.corrupted([entry[0] for entry in layout])) is not None:
            self._weightsync_corrupt(corrupted)
        elapsed = time.perf_counter() - started
        logger.info("weightsync: loaded %d tensors (%.1f MB) in %.3f s", len(layout), nbytes / 1e6, elapsed)
        return len(layout)

    def weightsync_read_back(self, entries: list[installed.ReadBackEntry], piece_bytes: int) -> list[str]:
        """Each tensor's checksum as this worker's model holds it (vllm_readback.py); "" where it has none."""
        from rollout_side.engines.vllm_readback import read_back

        return read_back(self.model_runner.get_model(), entries, piece_bytes)

    def _weightsync_corrupt(self, name: str) -> None:
        """The corrupt-installed failpoint (tests only): flips a bit of `name` as installed, on rank 0 only."""
        from vllm.distributed import get_tensor_model_parallel_rank

        from rollout_side.engines.vllm_readback import installed_param

        found = installed_param(self.model_runner.get_model(), name)
        if get_tensor_model_parallel_rank() != 0 or found is None:
            return
        module, param_name, _ = found
        param = getattr(module, param_name)
        if param.numel():
            installed.flip_byte(param)
        else:
            logger.warning("failpoint corrupt-installed: %s is packed away; nothing corrupted", name)

    def weightsync_booted_with(self) -> tuple[int, str] | None:
        """(version, staging path) the boot-time loader loaded in this worker (vllm_loader.py), or None."""
        from rollout_side.engines.vllm_loader import booted_with

        return booted_with()

    def _weightsync_flat(self, path: str, nbytes: int) -> torch.Tensor:
        """Maps the staging file, reusing the last mapping: receivers stage every version in one buffer."""
        cached = self._weightsync_map
        if cached is not None and cached[0] == path and cached[1] == nbytes:
            return cached[2]
        # Dropping the old mapping releases a staging file the engine has already unlinked.
        self._weightsync_map = None
        flat = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        self._weightsync_map = (path, nbytes, flat)
        return flat
