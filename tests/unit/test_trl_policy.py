"""What WeightsyncRollout pushes from a PEFT model it cannot push as an adapter: the base model's names, the
adapter merged in."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from trainer_side.integrations.trl import policy_state  # noqa: E402
from trainer_side.train import new_model  # noqa: E402

MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny"


def test_a_peft_policy_is_pushed_merged_under_the_base_models_names() -> None:
    if not (MODEL / "config.json").is_file():
        pytest.skip("models/tiny is not built (make model)")
    names = set(new_model(MODEL).state_dict())
    model = peft.get_peft_model(new_model(MODEL), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # a trained adapter: merging changes q_proj
    trainer = SimpleNamespace(model=model, accelerator=SimpleNamespace(num_processes=1, unwrap_model=lambda m: m))
    state = policy_state(trainer)
    assert set(state) == names  # tied lm_head included, no lora_ tensors
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]  # still tied: sent once
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not torch.equal(state["model.layers.0.self_attn.q_proj.weight"], layer.base_layer.weight)
    assert not layer.merged  # the trainer goes on with the adapter unmerged
