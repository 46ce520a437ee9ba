"""TRL's GRPOTrainer on weightsync: `GRPOTrainer(..., rollout_func=WeightsyncRollout(rollouts))`.

On each call TRL makes for a batch of prompts, the rollout function first pushes the policy if the
trainer's `global_step` moved since its last push (as version `global_step + 1`, the way TRL's own vLLM
server path syncs inside generation), then generates the completions TRL asks for on the rollouts, each
required to come from that version, with the trainer's sampling settings and per-token logprobs. A
rollout that dies is skipped with a warning, and training goes on while one is left.

Supported: one training process (no DeepSpeed ZeRO-3, no FSDP; refused with a message), plain models and
PEFT models. A PEFT LoRA policy travels as its adapter (docs/lora.md): the base once, as a full version,
again only when its weights changed or a rollout lost it, then each step's adapter as a version of its own;
a PEFT setup weightsync cannot merge exactly (DoRA, modules_to_save, ...) is pushed merged, as TRL's vLLM
path does. `push_policy` is the one place the weights leave the trainer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from trl.data_utils import is_conversational

from trainer_side.publisher import Publisher, PushResult
from weightsync.adapter import AdapterConfig
from weightsync.errors import Reason
from weightsync.generate_client import GenerateClient, Generated, NoRolloutLeft
from weightsync.manifest import manifest_of_state

__all__ = ["Push", "WeightsyncRollout", "policy_state"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class Push:
    """One push of the policy: the version, how long it took, which rollouts took it."""

    version: int  # the version completions come from (a PEFT policy's adapter version)
    step: int  # the trainer's global_step when it was pushed
    seconds: float
    committed: tuple[str, ...]


class WeightsyncRollout:
    """A `rollout_func` for TRL's GRPOTrainer that pushes the policy to weightsync rollouts and samples there.

    `token` and `credentials` are the publisher's (bearer token, TLS). `max_staleness` lets completions come
    from up to that many versions before the one just pushed (0: on-policy, every completion from it).
    `publisher_options` go to trainer_side.Publisher (delta=True, shared_memory=..., ...).
    """

    def __init__(
        self,
        rollouts: Sequence[str],
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_staleness: int = 0,
        timeout: float = 300.0,
        **publisher_options: Any,
    ) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be 0 or more, not {max_staleness}")
        publisher_options.setdefault("progress", False)
        self.publisher = Publisher(rollouts, token=token, credentials=credentials, **publisher_options)
        self.client = GenerateClient(rollouts, token=token, credentials=credentials, timeout=timeout)
        self.max_staleness = max_staleness
        self.pushes: list[Push] = []  # every push, in order
        self.version = 0  # the version pushed last
        # A PEFT policy's base as the rollouts hold it: its fingerprint, and the base weights' (address,
        # in-place write count) when it was taken, which tells cheaply whether the base may have changed.
        self.base_fingerprint = ""
        self._base_seen: tuple[tuple[int, int], ...] = ()

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, list[Any]]:
        """TRL's rollout_func: one completion per entry of `prompts` (a prompt repeated k times is one
        request for k completions); TRL's keys plus `weight_version`, which reaches the reward functions."""
        self.sync(trainer)
        runs = _runs(prompts)
        prompt_ids = tokenize([prompt for prompt, _ in runs], trainer)
        outs = self.client.generate_many(
            prompt_ids,
            n=[count for _, count in runs],
            min_weight_version=max(self.version - self.max_staleness, 1),
            wait_for_version=True,
            logprobs=True,
            **sampling(trainer),
        )
        completions: list[tuple[list[int], Generated]] = [
            (ids, out) for ids, group in zip(prompt_ids, outs, strict=True) for out in group
        ]
        versions = [out.weight_version for _, out in completions]
        logger.info(
            "step %d: %d completions from version(s) %s",
            trainer.state.global_step,
            len(versions),
            sorted(set(versions)),
        )
        return {
            "prompt_ids": [ids for ids, _ in completions],
            "completion_ids": [out.token_ids for _, out in completions],
            "logprobs": [out.logprobs or [] for _, out in completions],
            "weight_version": versions,
        }

    def sync(self, trainer: Any) -> Push | None:
        """Pushes the policy as version `global_step + 1` unless that step was pushed already (or later: a
        PEFT policy's base push takes a version of its own, and versions only move forward)."""
        step = int(trainer.state.global_step)
        if self.pushes and self.pushes[-1].step == step:
            return None
        started = time.perf_counter()
        results = self.push_policy(trainer, max(step + 1, self.version + 1))
        committed = self._keep_committed(results)
        version = max(r.version for r in results)
        push = Push(version=version, step=step, seconds=time.perf_counter() - started, committed=committed)
        self.pushes.append(push)
        self.version = push.version
        return push

    def push_policy(self, trainer: Any, version: int) -> list[PushResult]:
        """Pushes the trainer's policy as `version` (a PEFT LoRA policy: its adapter, as `version` or later
        when its base goes first): the one place the weights leave the trainer."""
        model = policy(trainer)
        config = lora_config(model)
        if config is None:
            return self.publisher.push(policy_state(trainer), version)
        return self._push_adapter(model, config, version)

    def _push_adapter(self, model: Any, config: dict[str, Any], version: int) -> list[PushResult]:
        """The adapter as `version`, after the base (as `version`, the adapter then one later) if the rollouts
        may not hold it: the first push, a base whose weights were written since, a rollout that lost it."""
        from peft import get_peft_model_state_dict

        adapter = get_peft_model_state_dict(model)
        for _ in range(2):
            if self._base_changed(model):
                base = peft_base_state(model)
                fingerprint = manifest_of_state(base).fingerprint
                if fingerprint != self.base_fingerprint:
                    self._keep_committed(self.publisher.push(base, version))
                    self.base_fingerprint, version = fingerprint, version + 1
            results = self.publisher.push_adapter(adapter, config, version, base_fingerprint=self.base_fingerprint)
            if not any(r.reason is Reason.ADAPTER_BASE_MISMATCH for r in results):
                return results
            # A rollout holds another base or none (it restarted): the base goes to every rollout again.
            self.base_fingerprint, self._base_seen, version = "", (), version + 1
        return results

    def _base_changed(self, model: Any) -> bool:
        """Whether the base weights may differ from those last pushed: replaced, or written in place since
        (torch counts in-place writes per tensor); only then is the base hashed again."""
        seen = tuple((p.data_ptr(), p._version) for name, p in model.named_parameters() if model.prefix not in name)
        changed = seen != self._base_seen or not self.base_fingerprint
        self._base_seen = seen
        return changed

    def _keep_committed(self, results: list[PushResult]) -> tuple[str, ...]:
        """Drops the rollouts that did not take the version (warning for each); the addresses that did."""
        for result in results:
            if not result.ok:
                why = f"did not take version {result.version} ({result.error}); skipped for the rest of the run"
                logger.warning("rollout %s %s", result.address, why)
                self.publisher.set_rollouts([], [result.address])
                self.client.drop(result.address, why)
        committed = tuple(r.address for r in results if r.ok)
        if not committed:
            lines = "; ".join(r.line() for r in results)
            raise NoRolloutLeft(f"no rollout took the policy, training cannot go on: {lines}")
        return committed

    def close(self) -> None:
        self.client.close()
        self.publisher.close()

    def __enter__(self) -> WeightsyncRollout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def policy_state(trainer: Any) -> dict[str, torch.Tensor]:
    """The trainer's policy as Hugging Face names and tensors (a PEFT adapter merged in), as TRL unwraps it.

    Raises:
        NotImplementedError: a setup this integration does not push from yet (several processes, DeepSpeed
            ZeRO-3, FSDP).
    """
    model = policy(trainer)
    if is_peft(model):
        model.merge_adapter()
        try:
            return peft_base_state(model)  # merged: the policy's weights
        finally:
            model.unmerge_adapter()
    return dict(model.state_dict())


def policy(trainer: Any) -> Any:
    """The trainer's model, unwrapped as TRL does.

    Raises:
        NotImplementedError: a setup this integration does not push from yet (several processes, DeepSpeed
            ZeRO-3, FSDP).
    """
    accelerator = trainer.accelerator
    if accelerator.num_processes > 1:
        raise NotImplementedError(
            f"WeightsyncRollout runs in one training process; this job has {accelerator.num_processes} "
            "(DDP, DeepSpeed and FSDP jobs are not supported yet: see docs/integrations.md)"
        )
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        raise NotImplementedError("WeightsyncRollout does not push from DeepSpeed or FSDP models yet")
    return accelerator.unwrap_model(trainer.model)


def is_peft(model: Any) -> bool:
    return hasattr(model, "merge_adapter") and hasattr(model, "peft_config")


def lora_config(model: Any) -> dict[str, Any] | None:
    """A PEFT model's active adapter_config.json fields, if weightsync can push it as an adapter; else None
    (a plain model, or a PEFT setup a rollout could not merge exactly: it is pushed merged)."""
    if not is_peft(model):
        return None
    config: dict[str, Any] = model.peft_config[model.active_adapter].to_dict()
    try:
        AdapterConfig.from_peft(config, (), base_fingerprint="")
    except (ValueError, KeyError) as error:
        logger.warning("pushing the PEFT policy merged, not as its adapter: %s", error)
        return None
    return config


def peft_base_state(model: Any) -> dict[str, torch.Tensor]:
    """A PEFT model's base-model weights under the base model's names (merged in, if the adapter is merged:
    as TRL's vLLM sync takes them); the adapter's own tensors left out."""
    prefix = model.prefix  # "lora_" for LoRA: the adapter's own tensors
    state: dict[str, torch.Tensor] = {}
    copies: dict[int, torch.Tensor] = {}  # tied names share one copy, so they go on the wire once, as tied
    for name, param in model.named_parameters(remove_duplicate=False):  # tied names too, as state_dict()
        if prefix in name or "original_module" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        copy = copies.setdefault(id(param), param.detach().clone())
        state[name.replace("modules_to_save.default.", "")] = copy
    return state


def tokenize(prompts: list[Any], trainer: Any) -> list[list[int]]:
    """Prompt token ids as the trainer makes them: conversations through the chat template."""
    processing = trainer.processing_class
    if is_conversational({"prompt": prompts[0]}):
        rendered = processing.apply_chat_template(
            conversation=prompts,
            tools=getattr(trainer, "tools", None) or None,
            chat_template=getattr(trainer, "chat_template", None),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **(getattr(trainer, "chat_template_kwargs", None) or {}),
        )
        return [list(ids) for ids in rendered["input_ids"]]
    return [list(ids) for ids in processing(text=prompts)["input_ids"]]


def sampling(trainer: Any) -> dict[str, Any]:
    """The trainer's sampling settings as Generate's (TRL's names; stop and seed from generation_kwargs)."""
    args = trainer.args
    extra = args.generation_kwargs if isinstance(args.generation_kwargs, dict) else {}
    stop = extra.get("stop") or ()
    return {
        "max_tokens": args.max_completion_length,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k or 0,
        "min_p": args.min_p or 0.0,
        "repetition_penalty": args.repetition_penalty,
        "stop": [stop] if isinstance(stop, str) else list(stop),
        "stop_token_ids": list(extra.get("stop_token_ids") or ()),
        "seed": extra.get("seed"),
    }


def _runs(prompts: list[Any]) -> list[tuple[Any, int]]:
    """Consecutive equal prompts as (prompt, count): TRL repeats each prompt num_generations times."""
    runs: list[tuple[Any, int]] = []
    for prompt in prompts:
        if runs and runs[-1][0] == prompt:
            runs[-1] = (prompt, runs[-1][1] + 1)
        else:
            runs.append((prompt, 1))
    return runs
