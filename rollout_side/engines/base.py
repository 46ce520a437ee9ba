"""The engine interface: what a rollout needs from whatever runs the model."""

from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from rollout_side.engines.installed import Verification
    from weightsync.manifest import Manifest

__all__ = ["LOGPROBS_MODES", "SWAP_POLICIES", "Completion", "Engine", "ParamSpec", "Sampling", "join_pieces"]

SWAP_POLICIES = ("drain", "abort", "continue")
# Which distribution logprobs come from, with vLLM's --logprobs-mode names: the model's raw one (vLLM's
# default), or the one the token was sampled from, after penalties, temperature, min_p, top_k, top_p.
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


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
    # vLLM's SamplingParams names and meanings. logprobs: None = none; k >= 0 = the sampled token's
    # logprob plus the k best alternatives, from the distribution the engine's logprobs_mode names.
    logprobs: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_k: int = 0  # 0: every token
    min_p: float = 0.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Completion:
    """Tokens produced by exactly one weight version (see `token_versions` for the exception).

    From `generate_stream` each Completion holds the tokens since the previous one and
    `finish_reason` is empty until the last ("abort": the swap policy abort ended it at a swap).
    """

    token_ids: list[int]
    text: str
    weight_version: int
    finish_reason: str
    # One per token when Sampling.logprobs is set: the sampled token's log-probability (engine's logprobs_mode).
    logprobs: list[float] | None = None
    # One per token when Sampling.logprobs > 0: {token id: logprob} of the best alternatives, best first.
    top_logprobs: list[dict[int, float]] | None = None
    # Swap policy continue only: one version per token when the tokens span versions (weight_version
    # is then the first token's); empty when weight_version produced every token.
    token_versions: list[int] = field(default_factory=list)
    # What weight_version is (Served.lineage): the full version it is or whose base the LoRA adapter it is
    # was merged into, and its adapter version (0: a full version). Filled by Generation, not by engines.
    base_fingerprint: str = ""
    adapter_version: int = 0


class Engine(ABC):
    """Runs a model whose weights a receiver swaps in, one complete version at a time.

    Contract: `load` is atomic with respect to `generate`: every request runs wholly on one
    version, and `weight_version` names it (under `swap_policy` "continue" a request may go on
    with the new version, and its Completion says which version produced which token). A failed
    `load` leaves `weight_version` at 0 until a later load succeeds, and requests already inside the
    engine end or are refused (EngineUnavailable) rather than run on the torn weights.

    An engine does not decide what the rollout serves: the receiver records each load's outcome in
    `Lifecycle.served` (rollout_side/update/served.py), which the version gate, GetStatus and health
    read. `load` may be called from a task its caller no longer waits for (the receiver shields a
    commit from a cancelled Commit), so it must not depend on its caller staying.
    """

    name: str = "engine"
    # What a load does to requests in flight (SWAP_POLICIES): "drain" waits for them (every request
    # runs wholly on one version), "abort" ends them with finish_reason "abort" and the tokens so far,
    # "continue" lets them go on with the new version and tags each token with its version.
    swap_policy: str = "drain"
    # Read the weights back after every load and hold them to the manifest's checksums before the version
    # serves (installed.py); a mismatch fails the load with InstalledMismatch. Off: --no-verify-installed.
    verify_installed: bool = True
    # LOGPROBS_MODES: what Completion.logprobs hold (vLLM's --logprobs-mode).
    logprobs_mode: str = "raw_logprobs"

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.verification: Verification | None = None  # the last read-back of the installed weights

    async def verify(self, manifest: Manifest, version: int) -> Verification:
        """Reads back what the engine holds and holds it to `manifest` (on demand, or after a standalone boot).

        A mismatch withdraws the version (the engine serves nothing until a later load) and raises
        InstalledMismatch. Engines that cannot read their weights back raise EngineUnavailable.
        """
        from weightsync.errors import EngineUnavailable

        raise EngineUnavailable(f"the {self.name} engine cannot read its weights back")

    @property
    def max_model_len(self) -> int:
        """Longest prompt plus completion, in tokens: the model's max_position_embeddings by default."""
        return int(_model_config(self.model_dir).get("max_position_embeddings") or UNBOUNDED)

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold are below this: the model's vocab_size (its embedding rows)."""
        return int(_model_config(self.model_dir).get("vocab_size") or UNBOUNDED)

    async def prepare(self) -> None:  # noqa: B027
        """The part of booting that a push arriving meanwhile would slow down, done before the rollout
        listens (vLLM: its imports, which hold this process's GIL for seconds)."""

    @abstractmethod
    async def start(self, weights: Path | None = None, version: int = 0) -> None:
        """Boots the engine with dummy weights (never served), or in standalone mode with the real
        weights in `weights` (a safetensors file or a folder of them) served as `version`."""

    @abstractmethod
    def param_specs(self) -> Mapping[str, ParamSpec]:
        """Every tensor name the model accepts (Hugging Face names), aliases included."""

    @abstractmethod
    def allocate_staging(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 buffer where a receiver assembles one version before `load`."""

    @abstractmethod
    async def load(
        self, staging: torch.Tensor, manifest: Manifest, version: int, *, staged_sums: Sequence[str] = ()
    ) -> torch.Tensor | None:
        """Swaps in the staged version; from its return every new request sees `version`.

        `staged_sums`, if given: each tensor's checksum as taken over `staging` itself, where its bytes lie
        (the receiver's, as they landed), equal to the manifest's. An engine that installs that memory as its
        weights has it verified already; one that copies it elsewhere reads back the copy.
        Returns a buffer of the same size the receiver may reuse for the next staging
        (possibly `staging` itself), or None if it must allocate a new one.
        """

    def expect_at_boot(self, coming: bool) -> None:  # noqa: B027
        """Whether an update is being received while `start` still runs (False: it was dropped).

        An engine may wait for it at its load step rather than boot without it (vllm_loader.py does).
        """

    async def offer_at_boot(self, staging: torch.Tensor, manifest: Manifest, version: int) -> None:  # noqa: B027
        """A verified version committed while `start` still runs; `load` follows once it has returned.

        An engine may boot with it rather than swap it in after (vLLM's loader does: vllm_loader.py).
        """

    @property
    @abstractmethod
    def weight_version(self) -> int:
        """The version the engine's weights hold, which tags its completions; 0 when none is complete.

        Not what the rollout serves (a dummy boot holds weights, a failed load torn ones): read
        `Lifecycle.served` for that.
        """

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


UNBOUNDED = 1 << 31  # a model folder that does not say


@functools.cache
def _model_config(model_dir: Path) -> dict[str, Any]:
    """The model's config.json (its text part, for a multimodal one); empty if there is none."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return dict(config.get("text_config") or config)


def join_pieces(pieces: list[Completion], text: str) -> Completion:
    """The streamed pieces of one completion as one Completion whose text is `text`."""
    tokens = [t for p in pieces for t in p.token_ids]
    versions = [p.weight_version for p in pieces for _ in p.token_ids]
    first = versions[0] if versions else (pieces[-1].weight_version if pieces else 0)
    finish = next((p.finish_reason for p in reversed(pieces) if p.finish_reason), "length")
    logprobs = [x for p in pieces for x in p.logprobs or ()] if any(p.logprobs is not None for p in pieces) else None
    top = [x for p in pieces for x in p.top_logprobs or ()] if any(p.top_logprobs is not None for p in pieces) else None
    return Completion(
        token_ids=tokens,
        text=text,
        weight_version=first,
        finish_reason=finish,
        logprobs=logprobs,
        top_logprobs=top,
        token_versions=versions if len(set(versions)) > 1 else [],
    )
