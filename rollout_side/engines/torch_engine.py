"""The reference engine: a Hugging Face transformers model run with plain torch.

Light and dependency-free beyond transformers, it serves machines without vLLM and is the
yardstick the tests hold the weight path against.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import typing
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from rollout_side.compat import meta_param_specs, model_param_specs
from rollout_side.engines.base import Completion, Engine, ParamSpec, Sampling
from weightsync.checkpoint import load_checkpoint
from weightsync.manifest import Manifest
from weightsync.memory import prefaulted_buffer

__all__ = ["TorchEngine"]

logger = logging.getLogger(__name__)

P = typing.ParamSpec("P")  # not engines.base.ParamSpec: the arguments _run passes on
R = TypeVar("R")


class TorchEngine(Engine):
    """Runs one request at a time on a single worker thread.

    The swap runs on that same thread, between requests, so no request ever sees two versions.
    Parameters become views into the staging buffer that was committed: the swap copies nothing,
    and the previous buffer goes back to the receiver for the next version.
    """

    name = "torch"

    def __init__(self, model_dir: Path, *, device: str = "cpu", seed: int = 0) -> None:
        super().__init__(model_dir)
        self.device = torch.device(device)
        self.seed = seed
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-engine")
        self._version = 0
        self._live: torch.Tensor | None = None  # the staging buffer the parameters point into
        self.config = AutoConfig.from_pretrained(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model: PreTrainedModel | None = None

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
        logger.info("torch engine up on %s (%s weights)", self.device, "real" if weights else "dummy")

    def param_specs(self) -> Mapping[str, ParamSpec]:
        return meta_param_specs(self.model_dir)

    def allocate_staging(self, nbytes: int) -> torch.Tensor:
        if self.device.type == "cuda":
            # Pinned host memory makes the host-to-device copy of the swap several times faster.
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        # Mapped now, not page by page while chunks stream in (fresh pages take writes at ~1 GB/s).
        return prefaulted_buffer(nbytes)

    async def load(self, staging: torch.Tensor, manifest: Manifest, version: int) -> torch.Tensor | None:
        return await self._run(self._swap, staging, manifest, version)

    def _swap(self, staging: torch.Tensor, manifest: Manifest, version: int) -> torch.Tensor | None:
        assert self.model is not None
        params = dict(self.model.named_parameters(remove_duplicate=False))
        try:
            with torch.no_grad():
                if self.device.type == "cpu":
                    for name, view in manifest.views(staging):
                        params[name].data = view
                    previous, self._live = self._live, staging
                else:
                    for name, view in manifest.views(staging):
                        params[name].data.copy_(view, non_blocking=True)
                    torch.cuda.synchronize(self.device)
                    previous = staging
        except BaseException:
            # Requests run on this thread, so none sees a half swap; after a failed one nothing
            # trustworthy is held. Until then the old version stays published: admission checks
            # on other threads must not see 0 in the middle of a swap that succeeds.
            self._version = 0
            raise
        self._version = version
        return previous

    @property
    def weight_version(self) -> int:
        return self._version

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> Completion:
        tokens: list[int] = []
        finish, version = "length", 0
        async for piece in self.generate_stream(prompt_ids, sampling):
            tokens += piece.token_ids
            finish, version = piece.finish_reason or finish, piece.weight_version
        return Completion(token_ids=tokens, text=self._decode(tokens), weight_version=version, finish_reason=finish)

    async def generate_stream(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[Completion]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Completion | BaseException] = asyncio.Queue()

        def produce() -> None:
            try:
                for piece in self._decode_loop(prompt_ids, sampling):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except BaseException as error:  # noqa: BLE001 - handed to the consumer, re-raised there
                loop.call_soon_threadsafe(queue.put_nowait, error)

        task = loop.run_in_executor(self._worker, produce)
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason:
                break
        await task

    def _decode_loop(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[Completion]:
        """Greedy or sampled decoding with a KV cache; runs wholly on the worker thread."""
        assert self.model is not None
        version = self._version
        generator = torch.Generator(device=self.device)
        if sampling.seed is not None:
            generator.manual_seed(sampling.seed)
        else:
            generator.seed()
        eos = set(_eos_ids(self.model))
        ids = torch.tensor([prompt_ids], device=self.device)
        past = None
        emitted: list[int] = []
        with torch.no_grad():
            for step in range(sampling.max_tokens):
                out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = _pick(out.logits[0, -1].float(), sampling, generator)
                emitted.append(token)
                last = token in eos or step == sampling.max_tokens - 1
                finish = ("stop" if token in eos else "length") if last else ""
                text = self._decode(emitted) if last else ""
                yield Completion(token_ids=[token], text=text, weight_version=version, finish_reason=finish)
                if last:
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


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _eos_ids(model: PreTrainedModel) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _tied_names(model: PreTrainedModel) -> set[str]:
    specs = model_param_specs(model)
    return {name for name, spec in specs.items() if spec.key != name}
