"""A logging handler that keeps the messages it receives, for tests that read what a process logged."""

from __future__ import annotations

import logging


class LogLines(logging.Handler):
    """Every message at `level` or above that reaches the logger it is added to, in order."""

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
