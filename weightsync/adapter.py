"""LoRA adapters as versions: PEFT's names and configuration, and the merge both sides agree on. Pure.

A trainer that trains a LoRA adapter over a frozen base pushes only the adapter (PEFT's `lora_A` /
`lora_B` tensors, 0.1-2% of the model) and names the base it applies to by fingerprint. The rollout
merges it into its copy of that base exactly as PEFT's `merge_and_unload` does on the CPU, so what
it serves is bit for bit the merged model a transformers + PEFT reference runs, and the merged weights
go through the same atomic swap as a full version (docs/lora.md says why merging, not vLLM's LoRA path).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["PEFT_PREFIX", "AdapterConfig", "merge_lora", "read_adapter_dir", "split_name"]

PEFT_PREFIX = "base_model.model."  # what PEFT puts before the base model's module names
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
# adapter_config.json fields that change what the adapter computes and that merging here does not do.
_UNSUPPORTED = (
    *("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern"),
    *("trainable_token_indices", "target_parameters", "layer_replication", "alora_invocation_tokens", "use_qalora"),
    *("use_bdlora", "velora_config", "monteclora_config", "kasa_config", "arrow_config"),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class AdapterConfig:
    """What of PEFT's adapter_config.json the merge needs, and the base the adapter applies to."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    base_fingerprint: str = ""

    @property
    def scaling(self) -> float:
        """PEFT's `scaling`: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    def targets(self, module: str) -> bool:
        """Whether `module` (a base model module name) is one the adapter may touch, as PEFT matches a list."""
        return any(module == t or module.endswith("." + t) for t in self.target_modules)

    @classmethod
    def from_peft(cls, config: Mapping[str, Any], names: Iterable[str], base_fingerprint: str) -> AdapterConfig:
        """From adapter_config.json's fields; `names` are the adapter's tensor names.

        Raises ValueError for what merging here does not support (DoRA, biases, modules_to_save, per-module
        ranks): such an adapter would serve differently from its reference. A regular-expression
        `target_modules` (a string) becomes the module names the tensors touch.
        """
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"only LoRA adapters can be pushed, not {config.get('peft_type')}")
        for key in _UNSUPPORTED:
            if config.get(key):
                raise ValueError(f"adapter_config.json sets {key}={config[key]!r}: not supported by weightsync")
        if config.get("bias", "none") != "none":
            raise ValueError(f"adapter_config.json sets bias={config['bias']!r}: only 'none' is supported")
        targets = config.get("target_modules") or ()
        if isinstance(targets, str):
            targets = sorted({split_name(n)[0].rsplit(".", 1)[-1] for n in names})
        return cls(
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            target_modules=tuple(sorted(targets)),
            use_rslora=bool(config.get("use_rslora", False)),
            base_fingerprint=base_fingerprint,
        )


def split_name(name: str) -> tuple[str, str]:
    """A PEFT tensor name as (the base model's module name, "A" or "B"); ValueError if it is not one."""
    for suffix, which in _SUFFIXES.items():
        if name.startswith(PEFT_PREFIX) and name.endswith(suffix):
            module = name[len(PEFT_PREFIX) : -len(suffix)]
            if module:
                return module, which
    raise ValueError(f"{name!r} is not a PEFT LoRA tensor name (base_model.model.<module>.lora_A|lora_B.weight)")


def merge_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`weight` with the adapter merged in, bit for bit as PEFT's `merge_and_unload` on the CPU with its defaults.

    PEFT keeps adapter weights in fp32 (autocast_adapter_dtype), so its merge (tuners/lora/layer.py,
    get_delta_weight and merge) scales B @ A in fp32 and adds that to the bf16 weight in fp32, rounding
    once. The bf16 factors that travel are exact in fp32, so this is that merge of the adapter as sent.
    """
    delta = (b.float() @ a.float()) * scaling
    return (weight.float() + delta).to(weight.dtype)


def read_adapter_dir(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A PEFT adapter folder (save_pretrained's adapter_model.safetensors and adapter_config.json)."""
    from safetensors.torch import load_file

    state = load_file(str(path / "adapter_model.safetensors"))
    config = json.loads((path / "adapter_config.json").read_text())
    return state, config
