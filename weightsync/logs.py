"""Logging set-up shared by both command lines: readable text, or JSON lines for log pipelines."""

from __future__ import annotations

import json
import logging
import re
import sys

__all__ = ["setup_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# Update ids carry their version ("v12-3fa9c1e2b7d0"), so a line naming one is tied to both.
_UPDATE_ID = re.compile(r"\b(v(\d+)-[0-9a-f]{6,})\b")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; update_id and version become fields wherever a line names an update."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
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
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
