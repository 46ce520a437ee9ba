"""One Generate request through vLLM behind the gate (vllm_gate.py): its outputs as Completions, and
under swap policy continue its resubmission across swaps, each token tagged with its version."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from rollout_side.engines.base import Completion, Sampling
from rollout_side.engines.vllm_gate import Gate, Hold
from weightsync.errors import BadRequest, EngineUnavailable

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

__all__ = ["stream"]


async def stream(llm: AsyncLLM, gate: Gate, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[Completion]:
    """The completion of one prompt in pieces (vLLM's deltas), from the version the gate admitted it on."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    try:
        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=max(sampling.top_k, 0),
            min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty or 1.0,
            seed=sampling.seed,
            logprobs=sampling.logprobs,
            stop=list(sampling.stop) or None,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            ignore_eos=sampling.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
    except (VLLMValidationError, ValueError) as exc:
        raise BadRequest(f"vLLM refused the sampling settings: {exc}") from None
    version = await gate.admit()
    queue: asyncio.Queue[Completion | BaseException | None] = asyncio.Queue()
    hold = Hold()
    # A separate task drains vLLM, so a slow reader cannot hold the gate (and block loads) after
    # vLLM has finished the request; the done callback releases even a task cancelled before starting.
    pump = asyncio.create_task(_pump(llm, gate, list(prompt_ids), params, version, queue, hold))
    pump.add_done_callback(lambda _: gate.let_go(hold))
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        pump.cancel()  # no-op once finished; otherwise vLLM aborts the request


async def _pump(
    llm: AsyncLLM,
    gate: Gate,
    prompt_ids: list[int],
    params: Any,
    version: int,
    queue: asyncio.Queue[Any],
    hold: Hold,
) -> None:
    """Feeds vLLM's outputs to `queue`; under swap policy continue, across swaps (see `Gate.closed`)."""
    from vllm.exceptions import VLLMClientError
    from vllm.inputs import TokensPrompt

    k, budget = params.logprobs, params.max_tokens
    emitted: list[int] = []  # every token so far, from whichever version
    request_id = ""
    try:
        while True:
            if gate.swap_policy == "continue" and not emitted and gate.swapping:
                # A swap began between admission and here: start on the new version, not hold it up.
                gate.let_go(hold)
                version = await gate.admit()
                hold.held = True
            request_id = f"ws-{uuid.uuid4().hex}"
            # Rendering checks the prompt (empty, too long, ids outside the vocabulary).
            (rendered,) = llm.renderer.render_cmpl([TokensPrompt(prompt_token_ids=prompt_ids + emitted)])
            gate.entered(request_id, continuable=True)
            swapped = False
            async for out in llm.generate(rendered, params, request_id=request_id):
                piece = out.outputs[0]
                ids = list(piece.token_ids)
                emitted += ids
                # A request that finished by itself before the swap's abort reached it is done.
                swapped = out.finished and piece.finish_reason == "abort" and request_id in gate.swapped
                finish = (piece.finish_reason or "") if out.finished and not swapped else ""
                if not (ids or piece.text or finish):
                    continue
                logprobs, top = _logprobs(ids, piece.logprobs, k)
                queue.put_nowait(
                    Completion(
                        token_ids=ids,
                        text=piece.text,
                        weight_version=version,
                        finish_reason=finish,
                        logprobs=logprobs,
                        top_logprobs=top,
                    )
                )
            gate.forget(request_id)
            if not swapped:
                break
            if len(emitted) >= budget:  # every token is in: nothing to continue
                queue.put_nowait(Completion(token_ids=[], text="", weight_version=version, finish_reason="length"))
                break
            # Swap policy continue: out of the gate so the swap can run, then on under the new version.
            gate.let_go(hold)
            try:
                version = await gate.admit()
            except EngineUnavailable:  # the swap failed: end as the torch engine does
                queue.put_nowait(Completion(token_ids=[], text="", weight_version=version, finish_reason="abort"))
                break
            hold.held = True
            params = params.clone()
            params.max_tokens = budget - len(emitted)
    except VLLMClientError as exc:
        queue.put_nowait(BadRequest(f"vLLM refused the request: {exc}"))
    except EngineUnavailable as exc:  # a failed swap, met on (re-)admission
        queue.put_nowait(exc)
    except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
        queue.put_nowait(EngineUnavailable(f"vLLM failed while generating: {exc!r}"))
    else:
        queue.put_nowait(None)
    finally:
        gate.forget(request_id)


def _logprobs(
    ids: list[int], positions: Any, k: int | None
) -> tuple[list[float] | None, list[dict[int, float]] | None]:
    """vLLM's per-position {token id: Logprob} as the sampled tokens' logprobs and the k best, best first."""
    if k is None or positions is None:
        return None, None
    logprobs = [float(position[token].logprob) for token, position in zip(ids, positions, strict=True)]
    if not k:
        return logprobs, None
    top = [
        {t: float(lp.logprob) for t, lp in sorted(position.items(), key=lambda item: item[1].rank) if lp.rank <= k}
        for position in positions
    ]
    return logprobs, top
