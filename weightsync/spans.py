"""Which weights produced which tokens, as runs: vLLM's `return_weight_versions` shape, for both sides."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Span", "version_spans"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Span:
    """Tokens [start, end) of a completion came from `version`."""

    version: int
    start: int
    end: int

    def json(self) -> dict[str, int]:
        return {"version": self.version, "start": self.start, "end": self.end}


def version_spans(versions: Sequence[int], offset: int = 0) -> list[Span]:
    """One version per token as runs [start, end) of one version each; positions start at `offset`."""
    spans: list[Span] = []
    for i, version in enumerate(versions, start=offset):
        if spans and spans[-1].version == version:
            spans[-1] = Span(version=version, start=spans[-1].start, end=i + 1)
        else:
            spans.append(Span(version=version, start=i, end=i + 1))
    return spans
