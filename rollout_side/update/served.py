"""What a rollout serves: the one record of the served version, its fingerprint and the last failure.

The lifecycle holds it (`Lifecycle.served`) and changes it only together with the phase it implies
(`Lifecycle.serve`, `Lifecycle.fail`), so the answers below never disagree with the phase. Generate's
version gate, GetStatus, the health service and the HTTP face read it and nothing else: an engine's
own version only tags the completions it produces and guards requests already inside it against a
failed swap (rollout_side/engines/base.py).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Served"]


@dataclass(slots=True)
class Served:
    """The version every new request runs on (0: none, nothing is served), its fingerprint, and why
    the last load failed ("" unless the engine holds weights no version names)."""

    version: int = 0
    fingerprint: str = ""
    failure: str = ""

    @property
    def ready(self) -> bool:
        """Whether a complete, committed version is served."""
        return self.version > 0

    def committed(self, version: int, fingerprint: str) -> None:
        self.version, self.fingerprint, self.failure = version, fingerprint, ""

    def failed(self, failure: str) -> None:
        """The engine's weights are no version's: nothing is served until a later load succeeds."""
        self.version, self.fingerprint, self.failure = 0, "", failure
