"""weightsync's vLLM plugin: what must run in every process vLLM starts, EngineCore included.

vLLM loads it through the `vllm.general_plugins` entry point (pyproject.toml), in its own processes
however they were started, which is the only hook that reaches EngineCore before it builds the model.
"""

from __future__ import annotations

from rollout_side.engines import vllm_loader, vllm_prewarm

__all__ = ["register"]


def register() -> None:
    """Registers the "weightsync" load format; in EngineCore, also ends it with its rollout."""
    vllm_loader.register()
    vllm_prewarm.watch_owner()
