"""What a torch rollout process holds once serving: its runtime and two copies of the model, not three.

On CPU the torch engine serves from the staging buffer it was pushed into and keeps one spare (the next
staging buffer). The parameters it built at boot are copied into that spare and freed; glibc kept those
frees resident (memory.keep_freed_memory raises its thresholds) until the engine handed them back.
"""

from __future__ import annotations

from pathlib import Path

from bench.measure import rss
from bench.models import TINY, make_model, model_bytes, random_state
from rollout_side.process import RolloutProcess
from trainer_side.publisher import Publisher


def _rss_serving(model_dir: Path) -> tuple[int, int]:
    """(resident bytes of a `serve --engine torch` rollout after its first push, the model's bytes)."""
    state = random_state(model_dir)
    with RolloutProcess(model_dir, engine="torch", args=["--log-level", "WARNING"]) as rollout:
        with Publisher([rollout.address], progress=False) as publisher:
            [result] = publisher.push(state, 1)
        assert result.ok, result.error
        return rss(rollout.pid), model_bytes(state)


def test_a_serving_torch_rollout_holds_two_copies_of_its_model(tmp_path: Path) -> None:
    runtime, _ = _rss_serving(TINY)
    serving, size = _rss_serving(make_model("256MiB", tmp_path))
    copies = (serving - runtime) / size
    assert copies < 2.5, f"{copies:.2f} copies of the model resident (served + spare is 2)"
