"""Tensor names as trainers write them, mapped to the rollout model's Hugging Face names."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

__all__ = ["WRAPPER_PREFIXES", "hf_name", "renamed"]

T = TypeVar("T")

# What torch.compile, FSDP (1) and activation checkpointing insert into module paths.
WRAPPER_PREFIXES = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def hf_name(name: str) -> str:
    """`name` without wrapper components, wherever they sit ("model._orig_mod.layers.0..." too)."""
    for prefix in WRAPPER_PREFIXES:
        if prefix in name:
            name = ".".join(part for part in name.split(".") if f"{part}." != prefix)
    return name


def renamed(state: Mapping[str, T], rename: Callable[[str], str] | None = None) -> dict[str, T]:
    """`state` under the names the rollout knows: wrappers stripped, then `rename` (e.g. Megatron to HF).

    Raises ValueError if two tensors end up with one name.
    """
    out: dict[str, T] = {}
    for name, value in state.items():
        new = hf_name(name)
        if rename is not None:
            new = rename(new)
        if new in out:
            raise ValueError(f"two tensors are both named {new!r} once renamed (one of them is {name!r})")
        out[new] = value
    return out
