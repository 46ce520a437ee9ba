"""WeightsyncRollout with a PEFT LoRA policy (#24), driven as TRL's GRPOTrainer drives it, on a torch rollout.

The trainer here is only what the integration reads of TRL's (global_step, accelerator, model): the
policy is a real PEFT model and the pushes are real, through a TCP proxy that counts their bytes.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental" in TRL 1.16
pytest.importorskip("trl", reason="TRL is not installed: `pip install -e .[trl]` (make venv installs it)")

from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from trainer_side.integrations.trl import WeightsyncRollout
from trainer_side.train import greedy
from weightsync.manifest import manifest_of_state
from weightsync.v1 import weightsync_pb2 as pb

from conftest import Rollout, reference_model
from lora import MAX_TOKENS, PROMPTS, TARGETS, Adapter, prompt_ids, replies, three_adapters
from proxy import Proxy


def trainer_of(model: Any, step: int) -> Any:
    """What WeightsyncRollout reads of a GRPOTrainer: its step, its accelerator (one process) and its model."""
    accelerator = SimpleNamespace(num_processes=1, unwrap_model=lambda m: m)
    return SimpleNamespace(state=SimpleNamespace(global_step=step), accelerator=accelerator, model=model)


def merged_answers(model: Any, tokenizer: Any) -> dict[str, list[int]]:
    """transformers + PEFT, the adapter merged: what the rollout must answer."""
    merged = copy.deepcopy(model).merge_and_unload().eval()
    return {p: greedy(merged, prompt_ids(tokenizer, p), MAX_TOKENS) for p in PROMPTS}


def test_a_peft_policy_pushes_its_base_once_then_only_its_adapter(
    rollout: Rollout, model_dir: Path, trained_state: dict[str, torch.Tensor], tokenizer: Any
) -> None:
    """Step 0 pushes the base and the adapter; steps 1 and 2 only the adapter (bytes on the wire within 2% of
    its bf16 size); each version answers as transformers + PEFT merged and says its adapter version and base.
    A base written in place goes again."""
    _, adapters = three_adapters(model_dir, trained_state, tokenizer)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(reference_model(model_dir, trained_state), config)
    base = manifest_of_state(trained_state).fingerprint
    proxy = Proxy(rollout.address)
    push = WeightsyncRollout([proxy.address])

    def step(k: int, adapter: Adapter) -> int:
        set_peft_model_state_dict(model, adapter.state)  # the adapter "trained" to this step
        proxy.reset()
        pushed = push.sync(trainer_of(model, k))
        assert pushed is not None and pushed.committed == (proxy.address,)
        expected = merged_answers(model, tokenizer)
        assert expected == adapter.reference  # the seeds' references: no near-tie decides a token
        got = {p: (list(r.token_ids), r.weight_version, r.adapter_version, r.base_fingerprint) for p, r in answers()}
        assert got == {p: (expected[p], pushed.version, pushed.version, base) for p in PROMPTS}
        return proxy.sent

    def answers() -> Any:
        return replies(rollout.generate, tokenizer).items()

    try:
        first = step(0, adapters[0])
        assert first > sum(t.numel() * 2 for t in trained_state.values()) // 2, "the base went first"
        assert [p.version for p in push.pushes] == [2]  # the base took version 1
        for k, adapter in enumerate(adapters[1:], start=1):
            sent = step(k, adapter)
            assert sent <= adapter.nbytes * 1.02, f"{sent} bytes on the wire for a {adapter.nbytes}-byte adapter"
        assert [p.version for p in push.pushes] == [2, 3, 4]

        # The base written in place (a trainer that unfroze it): it goes again, before the adapter.
        with torch.no_grad():
            embed = model.get_input_embeddings().weight
            embed[0] += 1.0
        proxy.reset()
        pushed = push.sync(trainer_of(model, 3))
        assert pushed is not None and pushed.version == 6 and proxy.sent > first // 2
        status = rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=10)
        assert status.base_fingerprint == push.base_fingerprint != base
        assert (status.weight_version, status.adapter_version) == (6, 6)
    finally:
        push.close()
        proxy.close()
