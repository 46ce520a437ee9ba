"""Imported first in the pre-warmed fork server (vllm_prewarm.PRELOAD): ties it to its rollout.

Its import is the only code of weightsync's the fork server runs before it serves; the fork server is
then SIGKILLed by the kernel when its rollout exits (vllm_prewarm.die_with), and its EngineCore with it.
"""

from __future__ import annotations

from rollout_side.engines.vllm_prewarm import watch_owner

watch_owner()
