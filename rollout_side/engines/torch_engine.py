"""The reference engine: a Hugging Face transformers model run with plain torch.

Light and dependency-free beyond transformers, it serves machines without vLLM and is the
yardstick the tests hold the weight path against.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
import typing
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from rollout_side.engines import installed
from rollout_side.engines.base import (
    LOGPROBS_MODES,
    SWAP_POLICIES,
    Completion,
    Engine,
    ParamSpec,
    Sampling,
    join_pieces,
)
from rollout_side.update.compat import meta_param_specs, model_param_specs
from weightsync.checkpoint import load_checkpoint
from weightsync.errors import InstalledMismatch
from weightsync.manifest import Manifest, TensorEntry
from weightsync.memory import prefaulted_buffer, release_freed_memory
from weightsync.metrics import Rollout as RolloutMetrics

__all__ = ["TorchEngine"]

logger = logging.getLogger(__name__)

P = typing.ParamSpec("P")  # not engines.base.ParamSpec: the arguments _run passes on
R = TypeVar("R")


@dataclass(frozen=True, kw_only=True, slots=True)
class _Staged:
    """A CPU load made ready off the worker thread: the views to install, and their checksums if verified."""

    views: list[tuple[str, torch.Tensor]]
    sums: list[str] | None = None  # None: verification off
    seconds: float = 0.0  # hashing them took


class TorchEngine(Engine):
    """Runs one request at a time on a single worker thread.

    The swap runs on that same thread, between requests, so no request ever sees two versions.
    On CPU, parameters become views into the staging buffer that was committed: the swap copies nothing,
    and the previous buffer goes back to the receiver for the next version. Those views were hashed where
    they lie as their chunks landed (the receiver's sums; others are hashed before the swap, while the old
    version goes on generating); the swap itself only checks that each parameter is the memory hashed, so
    verification adds almost nothing to the pause generation sees.
    """

    name = "torch"

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "cpu",
        seed: int = 0,
        swap_policy: str = "drain",
        logprobs_mode: str = "raw_logprobs",
    ) -> None:
        super().__init__(model_dir)
        if swap_policy not in SWAP_POLICIES:
            raise ValueError(f"swap_policy must be one of {', '.join(SWAP_POLICIES)}, not {swap_policy!r}")
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, not {logprobs_mode!r}")
        self.swap_policy = swap_policy
        self.logprobs_mode = logprobs_mode
        self.device = torch.device(device)
        self.seed = seed
        # abort/continue: a load waiting for the worker thread; the running request performs it at its
        # next token boundary (abort: after ending itself; continue: then goes on with the new version).
        self._pending_swap: tuple[Callable[[], torch.Tensor | None], Future[torch.Tensor | None]] | None = None
        self._pending_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-engine")
        self._version = 0
        self._live: torch.Tensor | None = None  # the staging buffer the parameters point into
        self.config = AutoConfig.from_pretrained(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model: PreTrainedModel | None = None
        self._failpoints = installed.Failpoints.from_environ()  # tests only

    async def start(self, weights: Path | None = None, version: int = 0) -> None:
        await self._run(self._boot, weights, version)

    def _boot(self, weights: Path | None, version: int) -> None:
        torch.manual_seed(self.seed)
        model = AutoModelForCausalLM.from_config(self.config, dtype=torch.bfloat16)
        if weights is not None:
            state = {k: v.to(torch.bfloat16) for k, v in load_checkpoint(weights).items()}
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [m for m in missing if m not in _tied_names(model)]
            if missing or unexpected:
                raise ValueError(f"{weights} does not fit {self.model_dir}: missing {missing}, unexpected {unexpected}")
            model.tie_weights()
            self._version = version
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu":
            self._live = _flatten_parameters(self.model)
            release_freed_memory()  # the parameters as built, copied into the flat buffer: a model's size
        logger.info("torch engine up on %s (%s weights)", self.device, "real" if weights else "dummy")

    def param_specs(self) -> Mapping[str, ParamSpec]:
        return meta_param_specs(self.model_dir)

    def allocate_staging(self, nbytes: int) -> torch.Tensor:
        if self.device.type == "cuda":
            # Pinned host memory makes the host-to-device copy of the swap several times faster.
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        # Mapped now, not page by page while chunks stream in (fresh pages take writes at ~1 GB/s).
        return prefaulted_buffer(nbytes)

    async def load(
        self, staging: torch.Tensor, manifest: Manifest, version: int, *, staged_sums: Sequence[str] = ()
    ) -> torch.Tensor | None:
        cpu = self.device.type == "cpu"
        staged = await asyncio.to_thread(self._stage, staging, manifest, version, staged_sums) if cpu else None
        swap = functools.partial(self._swap, staging, manifest, version, staged)
        if self.swap_policy == "drain":  # behind every request already queued on the worker thread
            return await self._run(swap)
        done: Future[torch.Tensor | None] = Future()
        with self._pending_lock:
            self._pending_swap = (swap, done)
        # Runs it if no request reaches a token boundary first (an idle engine, or only queued requests).
        self._worker.submit(self._run_pending_swap)
        return await asyncio.wrap_future(done)

    def _stage(self, staging: torch.Tensor, manifest: Manifest, version: int, staged_sums: Sequence[str]) -> _Staged:
        """Off the worker thread (CPU): the views `_swap` installs, hashed and held to `manifest` when verifying.

        A view that is `staging`'s own memory takes its sum from `staged_sums` (hashed there as it landed,
        and held to the manifest at commit): one pass per byte. Any other (a misaligned view's copy, or
        staging whose sums nobody took) is hashed here. A mismatch raises StagedMismatch before anything
        changed: the old version keeps serving.
        """
        views = list(manifest.views(staging))  # once: a misaligned view is a copy, and the copy is what is hashed
        if (flipped := self._failpoints.staged_corrupted([name for name, _ in views])) is not None:
            installed.flip_byte(dict(views)[flipped])
        if not self.verify_installed:
            return _Staged(views=views)
        started = time.perf_counter()
        base = staging.data_ptr()
        known = [
            staged_sums[i] if staged_sums and view.data_ptr() == base + e.offset else ""
            for i, (e, (_, view)) in enumerate(zip(manifest, views, strict=True))
        ]
        hashed = installed.sums_of(
            ((None if k else view, e.offset) for k, e, (_, view) in zip(known, manifest, views, strict=True)),
            manifest.piece_bytes,
        )
        sums = [k or h for k, h in zip(known, hashed, strict=True)]
        verification = installed.compare(manifest, version, [sums], started)
        if not verification.ok:
            raise verification.error(staged=True)
        return _Staged(views=views, sums=sums, seconds=verification.seconds)

    def _run_pending_swap(self) -> bool:
        """On the worker thread: performs the pending swap, if any; True if one ran."""
        with self._pending_lock:
            pending, self._pending_swap = self._pending_swap, None
        if pending is None:
            return False
        swap, done = pending
        try:
            done.set_result(swap())
        except BaseException as error:  # noqa: BLE001 - the load's caller re-raises it
            done.set_exception(error)
        return True

    def _swap(
        self, staging: torch.Tensor, manifest: Manifest, version: int, staged: _Staged | None
    ) -> torch.Tensor | None:
        """On the worker thread: installs `version`, checks it when verifying, and publishes it.

        `staged` (CPU): its views become the parameters; `_check_held` then proves each parameter is the
        memory `_stage` hashed. Without it (CUDA, untested here) the views are copied into the parameters
        and every parameter is hashed after, here, in the pause.
        """
        assert self.model is not None
        started = time.perf_counter()
        params = dict(self.model.named_parameters(remove_duplicate=False))
        names = [e.name for e in manifest]
        skipped = self._failpoints.skipped(names)
        corrupted = self._failpoints.corrupted(names)
        try:
            with torch.no_grad():
                if staged is not None:
                    for name, view in staged.views:
                        if name != skipped:
                            params[name].data = view
                    if corrupted is not None:  # other bytes than were hashed: see Failpoints
                        params[corrupted].data = installed.corrupted_copy(params[corrupted])
                    previous, self._live = self._live, staging
                else:
                    for name, view in manifest.views(staging):
                        if name != skipped:
                            params[name].data.copy_(view, non_blocking=True)
                    torch.cuda.synchronize(self.device)
                    previous = staging
                    if corrupted is not None:
                        installed.flip_byte(params[corrupted])
            if self.verify_installed:  # before the version is published: nothing unverified is served
                if staged is not None:
                    self._check_held(manifest, version, staged, params)
                else:
                    self._check_installed(manifest, version)
        except BaseException:
            # Requests run on this thread, so none sees a half swap; after a failed one nothing
            # trustworthy is held. Until then the old version stays published: admission checks
            # on other threads must not see 0 in the middle of a swap that succeeds.
            self._version = 0
            raise
        finally:
            pause = time.perf_counter() - started
            RolloutMetrics.swap_pause_seconds.observe(pause)
        self._version = version
        logger.info("version %d swapped in: generation paused %.1f ms", version, pause * 1e3)
        return previous

    async def verify(self, manifest: Manifest, version: int) -> installed.Verification:
        return await self._run(self._verify, manifest, version)

    def _verify(self, manifest: Manifest, version: int) -> installed.Verification:
        try:
            return self._check_installed(manifest, version)
        except InstalledMismatch:
            self._version = 0
            raise

    def _check_installed(self, manifest: Manifest, version: int) -> installed.Verification:
        """On the worker thread: hashes every parameter named in `manifest` as the model holds it."""
        started = time.perf_counter()
        assert self.model is not None
        held = _held(manifest, dict(self.model.named_parameters(remove_duplicate=False)))
        sums = installed.sums_of(
            ((tensor, e.offset) for e, tensor in zip(manifest, held, strict=True)), manifest.piece_bytes
        )
        return self._verified(installed.compare(manifest, version, [sums], started))

    def _check_held(
        self, manifest: Manifest, version: int, staged: _Staged, params: Mapping[str, torch.Tensor]
    ) -> installed.Verification:
        """On the worker thread, after a CPU swap: each parameter is the view `_stage` hashed, or is hashed here.

        `params`: the model's named parameters (tied ones under each name), as `_swap` already listed them.
        """
        assert staged.sums is not None
        started = time.perf_counter() - staged.seconds  # the verification's time: the hash before the swap and this
        held = _held(manifest, params)
        sums = installed.sums_held(manifest, held, [view for _, view in staged.views], staged.sums)
        return self._verified(installed.compare(manifest, version, [sums], started))

    def _verified(self, verification: installed.Verification) -> installed.Verification:
        """Records a read-back (GetStatus reports it) and raises its InstalledMismatch if it failed."""
        self.verification = verification
        if not verification.ok:
            raise verification.error()
        return verification

    @property
    def weight_version(self) -> int:
        return self._version

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> Completion:
        pieces = [piece async for piece in self.generate_stream(prompt_ids, sampling)]
        return join_pieces(pieces, pieces[-1].text if pieces else "")

    async def generate_stream(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[Completion]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Completion | BaseException] = asyncio.Queue()
        # Set when the reader is gone (cancelled, deadline passed, stream closed): decoding stops at the
        # next token, and a request still queued behind others never starts.
        abandoned = threading.Event()

        def produce() -> None:
            if abandoned.is_set():
                return
            try:
                for piece in self._decode_loop(prompt_ids, sampling):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
                    if abandoned.is_set():
                        return
            except BaseException as error:  # noqa: BLE001 - handed to the consumer, re-raised there
                loop.call_soon_threadsafe(queue.put_nowait, error)

        task = loop.run_in_executor(self._worker, produce)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    break
        finally:
            abandoned.set()
        await task

    def _decode_loop(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[Completion]:
        """Greedy or sampled decoding with a KV cache; runs wholly on the worker thread.

        The last piece carries the whole text (stop strings cut off). Under the swap policies abort and
        continue a pending swap runs at a token boundary: abort ends the request there; continue
        recomputes the KV cache of prompt + tokens so far with the new weights and goes on.
        """
        assert self.model is not None
        self._run_pending_swap()  # a request not yet started runs wholly on the new version
        version = self._version
        generator = torch.Generator(device=self.device)
        if sampling.seed is not None:
            generator.manual_seed(sampling.seed)
        else:
            generator.seed()
        eos = set() if sampling.ignore_eos else set(_eos_ids(self.model))
        stops = eos | set(sampling.stop_token_ids)
        ids = torch.tensor([prompt_ids], device=self.device)
        past = None
        emitted: list[int] = []
        with torch.no_grad():
            for step in range(sampling.max_tokens):
                if step and self._pending_swap is not None:
                    if self.swap_policy == "continue":
                        self._run_pending_swap()
                    if self.swap_policy == "abort" or self._version == 0:  # 0: the swap failed
                        text = self._decode(emitted)
                        yield Completion(token_ids=[], text=text, weight_version=version, finish_reason="abort")
                        return
                    if self._version != version:
                        version, past = self._version, None
                        ids = torch.tensor([prompt_ids + emitted], device=self.device)
                out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                raw = out.logits[0, -1].float()
                processed = _processed(raw, sampling, prompt_ids + emitted)
                token = _pick(processed, sampling, generator)
                logged = processed if self.logprobs_mode == "processed_logprobs" else raw
                logprobs, top = _logprobs(logged, token, sampling.logprobs)
                emitted.append(token)
                finish = "stop" if token in stops else ""
                text = ""
                if sampling.stop:
                    text, hit = _cut_at_stop(self._decode(emitted), sampling.stop)
                    finish = "stop" if hit else finish
                if not finish and step == sampling.max_tokens - 1:
                    finish = "length"
                if finish and not sampling.stop:
                    text = self._decode(emitted)
                yield Completion(
                    token_ids=[token],
                    text=text if finish else "",
                    weight_version=version,
                    finish_reason=finish,
                    logprobs=logprobs,
                    top_logprobs=top,
                )
                if finish:
                    return
                ids = torch.tensor([[token]], device=self.device)

    def _decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    async def _run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._worker, functools.partial(fn, *args, **kwargs))

    async def shutdown(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)


def _flatten_parameters(model: torch.nn.Module) -> torch.Tensor | None:
    """Moves every parameter into one flat, pre-faulted buffer and returns it (None if dtypes differ).

    The first swap hands this buffer back to the receiver as the next staging buffer, so even
    the second version streams into warm pages instead of a fresh allocation.
    """
    params = list(model.parameters())  # tied parameters once
    if len({p.dtype for p in params}) != 1:
        return None
    total = sum(p.numel() * p.element_size() for p in params)
    flat = prefaulted_buffer(total)
    offset = 0
    with torch.no_grad():
        for param in params:
            size = param.numel() * param.element_size()
            view = flat[offset : offset + size].view(param.dtype).view(param.shape)
            view.copy_(param.data)
            param.data = view
            offset += size
    return flat


def _held(manifest: Manifest, params: Mapping[str, torch.Tensor]) -> list[torch.Tensor | None]:
    """Each parameter named in `manifest` as the model holds it; None: not as sent (a failure, never a skip)."""

    def held(entry: TensorEntry) -> torch.Tensor | None:
        param = params.get(entry.name)
        if param is None or tuple(param.shape) != entry.shape or param.dtype != entry.dtype:
            return None
        return param

    return [held(e) for e in manifest]


def _logprobs(
    logits: torch.Tensor, token: int, k: int | None
) -> tuple[list[float] | None, list[dict[int, float]] | None]:
    """The sampled token's log-softmax of `logits` and the k best alternatives' (raw or processed logits)."""
    if k is None:
        return None, None
    logp = torch.log_softmax(logits, dim=-1)
    if not k:
        return [float(logp[token])], None
    values, indices = torch.topk(logp, k)
    return [float(logp[token])], [dict(zip(indices.tolist(), values.tolist(), strict=True))]


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one occurred (vLLM leaves the stop string out)."""
    hits = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _processed(logits: torch.Tensor, sampling: Sampling, seen: list[int]) -> torch.Tensor:
    """The logits a token is picked from, in the order of vLLM's sampler: the repetition penalty on tokens
    `seen` (prompt and output), then for sampling temperature, min_p, top_k and top_p (dropped tokens -inf)."""
    penalty = sampling.repetition_penalty
    if penalty and penalty != 1.0 and seen:
        index = torch.tensor(sorted(set(seen)), device=logits.device)
        hit = logits[index]
        logits = logits.index_put((index,), torch.where(hit > 0, hit / penalty, hit * penalty))
    if sampling.temperature <= 0:
        return logits
    logits = logits / sampling.temperature
    if sampling.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < sampling.min_p * probs.max(), -math.inf)
    if 0 < sampling.top_k < logits.numel():
        logits = logits.masked_fill(logits < torch.topk(logits, sampling.top_k).values[-1], -math.inf)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(torch.softmax(logits, dim=-1), descending=True)
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= sampling.top_p
        logits = logits.index_put((order[drop],), torch.tensor(-math.inf, device=logits.device))
    return logits


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Greedy (argmax) at temperature 0, else a draw from the softmax of the processed `logits`."""
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def _eos_ids(model: PreTrainedModel) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _tied_names(model: PreTrainedModel) -> set[str]:
    specs = model_param_specs(model)
    return {name for name, spec in specs.items() if spec.key != name}
