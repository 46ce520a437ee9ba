"""Whether a manifest fits a model, decided once for every engine: the tensors a model takes, and the checks.

Both engines name tensors as Hugging Face does (vLLM fuses some internally and maps the names itself),
so one description of the model (`model_param_specs`) and one check (`check_manifest`) serve both, and
the receiver refuses a version before a byte of it arrives. Pure functions: no engine, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from rollout_side.engines.base import ParamSpec
from weightsync.adapter import AdapterConfig, split_name
from weightsync.errors import BadManifest
from weightsync.limits import MAX_TENSOR_NAME_BYTES
from weightsync.logs import shown as quoted
from weightsync.manifest import Manifest, TensorEntry

__all__ = ["check_adapter", "check_manifest", "max_update_bytes", "meta_param_specs", "model_param_specs"]


def model_param_specs(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, ParamSpec]:
    """Every floating-point parameter of `model`; tied tensors share the key of the first name seen."""
    keys: dict[int, str] = {}
    specs = {}
    # keep_vars gives the Parameter objects, so tied aliases are recognised by identity.
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point() or not isinstance(tensor, torch.nn.Parameter):
            continue
        key = keys.setdefault(id(tensor), name)
        specs[name] = ParamSpec(shape=tuple(tensor.shape), dtype=dtype, key=key)
    return specs


def meta_param_specs(model_dir: Path, dtype: torch.dtype = torch.bfloat16) -> dict[str, ParamSpec]:
    """`model_param_specs` of the model in `model_dir`, built on the meta device: names and shapes, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return model_param_specs(AutoModelForCausalLM.from_config(config), dtype)


def check_manifest(specs: Mapping[str, ParamSpec], manifest: Manifest) -> None:
    """Refuses (BadManifest) a manifest that is not one complete version of the model `specs` describes.

    Every tensor must be a parameter with the model's shape and dtype, every parameter must be there
    (under one of its names, if tied), and tied tensors sent under two names must have equal checksums.
    """
    covered: dict[str, TensorEntry] = {}
    for entry in manifest:
        if len(entry.name) > MAX_TENSOR_NAME_BYTES:
            raise BadManifest(f"a tensor name of {len(entry.name)} characters; at most {MAX_TENSOR_NAME_BYTES}")
        spec = specs.get(entry.name)
        if spec is None:
            raise BadManifest(f"unknown tensor {quoted(entry.name, 200)}: this model has no such parameter")
        if entry.shape != spec.shape:
            raise BadManifest(f"tensor {entry.name!r} has shape {list(entry.shape)}, model expects {list(spec.shape)}")
        if entry.dtype != spec.dtype:
            raise BadManifest(f"tensor {entry.name!r} is {entry.dtype}, this rollout takes {spec.dtype}")
        first = covered.setdefault(spec.key, entry)
        if first.checksum != entry.checksum:
            raise BadManifest(f"tensors {first.name!r} and {entry.name!r} are tied in this model but differ")
    missing = sorted({s.key for s in specs.values()} - covered.keys())
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise BadManifest(f"missing tensors: {shown}; a full version must carry every parameter")


def max_update_bytes(specs: Mapping[str, ParamSpec]) -> int:
    """The largest valid update: every name once, tied aliases included."""
    return sum(math.prod(spec.shape) * spec.dtype.itemsize for spec in specs.values())


def check_adapter(specs: Mapping[str, ParamSpec], config: AdapterConfig, manifest: Manifest) -> None:
    """Refuses (BadManifest) an adapter that does not fit this model: PEFT names of untied 2-D weights it
    targets, an `lora_A` of shape [rank, in] and an `lora_B` of [out, rank] for each, in bf16."""
    factors: dict[str, dict[str, TensorEntry]] = {}
    for entry in manifest:
        if len(entry.name) > MAX_TENSOR_NAME_BYTES:
            raise BadManifest(f"a tensor name of {len(entry.name)} characters; at most {MAX_TENSOR_NAME_BYTES}")
        try:
            module, which = split_name(entry.name)
        except ValueError as error:
            raise BadManifest(str(error)) from None
        weight = f"{module}.weight"
        spec = specs.get(weight)
        if spec is None or len(spec.shape) != 2:
            raise BadManifest(f"adapter tensor {quoted(entry.name, 200)}: this model has no 2-D {quoted(weight, 200)}")
        if not config.targets(module):
            raise BadManifest(f"adapter tensor {entry.name!r}: {module!r} is not in target_modules")
        if any(s.key == spec.key and name != weight for name, s in specs.items()):
            raise BadManifest(f"adapter tensor {entry.name!r}: {weight!r} is tied to another weight; not supported")
        out_features, in_features = spec.shape
        shape = (config.rank, in_features) if which == "A" else (out_features, config.rank)
        if entry.shape != shape or entry.dtype != torch.bfloat16:
            raise BadManifest(
                f"adapter tensor {entry.name!r} is {list(entry.shape)} {entry.dtype}; expected {list(shape)} bf16"
            )
        factors.setdefault(module, {})[which] = entry
    lone = sorted(m for m, pair in factors.items() if len(pair) != 2)
    if lone or not factors:
        raise BadManifest(f"an adapter needs lora_A and lora_B for every module; incomplete: {lone[:5] or 'empty'}")
