"""What a rollout serves: the one record of the served version, its fingerprint (and, for a LoRA adapter, its
base's) and the last failure.

The lifecycle holds it (`Lifecycle.served`) and changes it only together with the phase it implies
(`Lifecycle.serve`, `Lifecycle.fail`), so the answers below never disagree with the phase. Generate's
version gate, GetStatus, the health service and the HTTP face read it and nothing else: an engine's
own version only tags the completions it produces and guards requests already inside it against a
failed swap (rollout_side/engines/base.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Lineage", "Served"]

# Lineages kept for completions still to be answered: a request in flight runs on one of the latest versions.
KEPT_LINEAGES = 64


@dataclass(frozen=True, slots=True)
class Lineage:
    """What a version is: the full version it is or whose base it is merged into, and its adapter version
    (the version itself when it is a LoRA adapter; 0: a full version, or an unknown one)."""

    base_fingerprint: str = ""
    adapter_version: int = 0


@dataclass(slots=True)
class Served:
    """The version every new request runs on (0: none, nothing is served), its fingerprint, and why
    the last load failed ("" unless the engine holds weights no version names)."""

    version: int = 0
    fingerprint: str = ""
    failure: str = ""
    base_fingerprint: str = ""  # the full version served, or the base the served LoRA adapter is merged into
    adapter_version: int = 0  # `version` when it is a LoRA adapter (merged into its base); 0: a full version
    # version -> its lineage, for the latest versions loaded; versions only move forward, so a version's
    # lineage never changes and a completion tagged with a version can be told its lineage afterwards.
    _lineages: dict[int, Lineage] = field(default_factory=dict, repr=False)

    @property
    def ready(self) -> bool:
        """Whether a complete, committed version is served."""
        return self.version > 0

    def committed(self, version: int, fingerprint: str, *, adapter_of: str = "") -> None:
        """`version` serves; `adapter_of` names the base when it is a LoRA adapter merged into that base."""
        self.version, self.fingerprint, self.failure = version, fingerprint, ""
        self.base_fingerprint, self.adapter_version = adapter_of or fingerprint, version if adapter_of else 0
        self.loading(version, fingerprint, adapter_of=adapter_of)

    def loading(self, version: int, fingerprint: str, *, adapter_of: str = "") -> None:
        """Records `version`'s lineage before the engine loads it: the engine tags completions with it from
        its load on, which may be before the version is committed here."""
        self._lineages[version] = Lineage(adapter_of or fingerprint, version if adapter_of else 0)
        while len(self._lineages) > KEPT_LINEAGES:
            del self._lineages[next(iter(self._lineages))]

    def lineage(self, version: int) -> Lineage:
        """The lineage of `version` as it was loaded, whatever is served now: what a completion tagged with
        `version` reports. Empty for a version never loaded (0: no weights)."""
        return self._lineages.get(version, Lineage())

    def failed(self, failure: str) -> None:
        """The engine's weights are no version's: nothing is served until a later load succeeds."""
        self.version, self.fingerprint, self.failure = 0, "", failure
        self.base_fingerprint, self.adapter_version = "", 0
