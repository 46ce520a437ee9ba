"""The trainer side of weightsync: publishes weight versions to rollout servers."""

from trainer_side.publisher import Publisher, PushResult

__all__ = ["Publisher", "PushResult"]
