"""Reading checkpoints from disk: a safetensors file or a folder of them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:
    import torch

__all__ = ["checkpoint_files", "load_checkpoint"]


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of `path` (a file, or a folder holding *.safetensors), each header checked.

    Reads only the headers, so a missing, empty, truncated or foreign file is refused in milliseconds,
    before anything slow starts: FileNotFoundError or ValueError with a message naming the file.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{path} does not exist")
    tensors = 0
    for file in files:
        try:
            with safe_open(file, "numpy") as handle:  # headers only: no torch import
                tensors += len(handle.keys())
        except SafetensorError as error:
            raise ValueError(f"{file} is not a valid safetensors file ({_reason(error)})") from None
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    return files


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Loads every tensor of `path` (a .safetensors file, or a folder holding *.safetensors)."""
    from safetensors.torch import load_file  # torch: imported when loading, not to check a command line

    state: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        try:
            state.update(load_file(file))
        except SafetensorError as error:
            raise ValueError(f"{file} is not a valid safetensors file ({_reason(error)})") from None
    return state


def _reason(error: Exception) -> str:
    """safetensors' reason without its boilerplate: 'header too small', 'incomplete metadata, ...'."""
    return str(error).removeprefix("Error while deserializing header: ")
