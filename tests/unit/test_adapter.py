"""LoRA adapters: the merge equals PEFT's bit for bit; configurations and manifests a merge cannot serve are refused."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from rollout_side.engines.base import ParamSpec
from rollout_side.update.compat import check_adapter
from weightsync.adapter import AdapterConfig, merge_lora, split_name
from weightsync.errors import BadManifest
from weightsync.manifest import build_manifest, manifest_of_state

from lora import round_to_bf16


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(64, 32, bias=False)
        self.embed = torch.nn.Embedding(10, 64)


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_is_peft_merge_bit_for_bit(rslora: bool) -> None:
    torch.manual_seed(0)
    model = Tiny().to(torch.bfloat16)
    base = model.q_proj.weight.detach().clone()
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], init_lora_weights=False, use_rslora=rslora)
    peft = get_peft_model(model, config)
    round_to_bf16(peft)  # what travels
    a, b = peft.base_model.model.q_proj.lora_A["default"].weight, peft.base_model.model.q_proj.lora_B["default"].weight
    scaling = AdapterConfig.from_peft(config.to_dict(), [], "sha256:x").scaling
    merged = merge_lora(base, a.detach(), b.detach(), scaling)
    expected = peft.merge_and_unload().q_proj.weight
    assert not torch.equal(merged, base)
    assert torch.equal(merged.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize(
    "field", [{"use_dora": True}, {"modules_to_save": ["lm_head"]}, {"rank_pattern": {"q_proj": 4}}, {"bias": "all"}]
)
def test_configurations_a_merge_would_serve_differently_are_refused(field: dict[str, object]) -> None:
    config = {**LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]).to_dict(), **field}
    with pytest.raises(ValueError, match=r"not supported|only 'none'"):
        AdapterConfig.from_peft(config, [], "sha256:x")


def test_a_regex_target_becomes_the_modules_the_tensors_touch() -> None:
    names = ["base_model.model.layers.0.q_proj.lora_A.weight", "base_model.model.layers.0.v_proj.lora_B.weight"]
    config = AdapterConfig.from_peft({"r": 4, "lora_alpha": 8, "target_modules": ".*proj"}, names, "sha256:x")
    assert config.target_modules == ("q_proj", "v_proj")
    assert split_name(names[0]) == ("layers.0.q_proj", "A")
    with pytest.raises(ValueError):
        split_name("model.layers.0.q_proj.weight")


SPECS = {
    "layers.0.q_proj.weight": ParamSpec(shape=(32, 64), dtype=torch.bfloat16, key="layers.0.q_proj.weight"),
    "embed.weight": ParamSpec(shape=(10, 64), dtype=torch.bfloat16, key="embed.weight"),
    "lm_head.weight": ParamSpec(shape=(10, 64), dtype=torch.bfloat16, key="embed.weight"),
}
CONFIG = AdapterConfig(rank=8, alpha=16, target_modules=("q_proj", "lm_head"), base_fingerprint="sha256:x")


def adapter(module: str, a: tuple[int, int], b: tuple[int, int], dtype: torch.dtype = torch.bfloat16):  # type: ignore[no-untyped-def]
    prefix = f"base_model.model.{module}"
    factors = {
        f"{prefix}.lora_A.weight": torch.ones(a, dtype=dtype),
        f"{prefix}.lora_B.weight": torch.ones(b, dtype=dtype),
    }
    return build_manifest(factors.items())


def test_an_adapter_that_fits_is_taken() -> None:
    check_adapter(SPECS, CONFIG, adapter("layers.0.q_proj", (8, 64), (32, 8)))


@pytest.mark.parametrize(
    ("manifest", "why"),
    [
        (adapter("layers.0.k_proj", (8, 64), (32, 8)), "no 2-D"),
        (adapter("layers.0.q_proj", (4, 64), (32, 4)), "expected"),
        (adapter("layers.0.q_proj", (8, 64), (32, 8), torch.float32), "expected"),
        (adapter("lm_head", (8, 64), (10, 8)), "tied"),
        (manifest_of_state({"base_model.model.layers.0.q_proj.lora_A.weight": torch.ones(8, 64)}), "incomplete"),
    ],
)
def test_an_adapter_that_does_not_fit_is_refused(manifest, why: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadManifest, match=why):
        check_adapter(SPECS, CONFIG, manifest)


def test_a_module_outside_target_modules_is_refused() -> None:
    config = AdapterConfig(rank=8, alpha=16, target_modules=("v_proj",), base_fingerprint="sha256:x")
    with pytest.raises(BadManifest, match="target_modules"):
        check_adapter(SPECS, config, adapter("layers.0.q_proj", (8, 64), (32, 8)))
