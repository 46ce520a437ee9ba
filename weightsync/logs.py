"""Logging set-up shared by both command lines: readable text, or JSON lines for log pipelines."""

from __future__ import annotations

import json
import logging
import re
import sys

__all__ = ["JsonFormatter", "TextFormatter", "setup_logging", "shown"]

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# Update ids carry their version ("v12-3fa9c1e2b7d0"), so a line naming one is tied to both.
_UPDATE_ID = re.compile(r"\b(v(\d+)-[0-9a-f]{6,})\b")
# Characters that could forge a log line or hide one: control characters and Unicode line separators.
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
MAX_MESSAGE_CHARS = 4096  # a log line never carries more of a message than this


def shown(value: str | bytes, limit: int = 64) -> str:
    """`value` quoted for a log line or an error message: escaped, and at most `limit` characters of it.

    For anything a caller sent (ids, names, paths): one line whatever it holds, and bounded.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    text = repr(value[:limit])
    return text + f"... ({len(value)} characters)" if len(value) > limit else text


def _escaped(message: str) -> str:
    """One line, bounded: control characters escaped, the message cut at MAX_MESSAGE_CHARS."""
    cut = message[:MAX_MESSAGE_CHARS]
    if _UNSAFE.search(cut):
        cut = _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), cut)
    return cut + f"... ({len(message)} characters)" if len(message) > MAX_MESSAGE_CHARS else cut


def _safe(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of `record` whose message cannot span lines or grow without bound (the traceback may)."""
    message = record.getMessage()
    safe = _escaped(message)
    if safe == message:
        return record
    copy = logging.makeLogRecord(record.__dict__)
    copy.msg, copy.args = safe, None
    return copy


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, one line per message: a caller's newline cannot forge a second log line."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(_safe(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; update_id and version become fields wherever a line names an update."""

    def format(self, record: logging.LogRecord) -> str:
        message = _escaped(record.getMessage())
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        if match := _UPDATE_ID.search(message):
            entry["update_id"], entry["version"] = match.group(1), int(match.group(2))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
