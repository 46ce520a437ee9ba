"""The engine interface: what a rollout needs from whatever runs the model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from weightsync.manifest import Manifest

__all__ = ["Completion", "Engine", "ParamSpec", "Sampling"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ParamSpec:
    """A tensor the model accepts. Aliases (tied weights) share one `key`."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    key: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Sampling:
    """Decoding settings of one request; temperature 0 is greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Completion:
    """Tokens produced by exactly one weight version.

    From `generate_stream` each Completion holds the tokens since the previous one and
    `finish_reason` is empty until the last.
    """

    token_ids: list[int]
    text: str
    weight_version: int
    finish_reason: str


class Engine(ABC):
    """Runs a model whose weights a receiver swaps in, one complete version at a time.

    Contract: `load` is atomic with respect to `generate`: every request runs wholly on one
    version, and `weight_version` names it. A failed `load` leaves `weight_version` at 0
    (nothing trustworthy is served) until a later load succeeds.
    """

    name: str = "engine"

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir

    @abstractmethod
    async def start(self, weights: Path | None = None, version: int = 0) -> None:
        """Boots the engine with dummy (random) weights, or in standalone mode with the real
        weights in `weights` (a safetensors file or a folder of them) served as `version`."""

    @abstractmethod
    def param_specs(self) -> Mapping[str, ParamSpec]:
        """Every tensor name the model accepts (Hugging Face names), aliases included."""

    @abstractmethod
    def allocate_staging(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 buffer where a receiver assembles one version before `load`."""

    @abstractmethod
    async def load(self, staging: torch.Tensor, manifest: Manifest, version: int) -> torch.Tensor | None:
        """Swaps in the staged version; from its return every new request sees `version`.

        Returns a buffer of the same size the receiver may reuse for the next staging
        (possibly `staging` itself), or None if it must allocate a new one.
        """

    @property
    @abstractmethod
    def weight_version(self) -> int:
        """The version every new request will run on; 0 when no complete version is held."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Prompt text to token ids."""

    @abstractmethod
    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> Completion:
        """One whole completion, produced by one version."""

    @abstractmethod
    def generate_stream(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[Completion]:
        """The completion in pieces, all produced by one version."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Releases the engine's processes and memory."""
