"""Reading checkpoints from disk: a safetensors file or a folder of them."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

__all__ = ["load_checkpoint"]


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Loads every tensor of `path` (a .safetensors file, or a folder holding *.safetensors)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state
