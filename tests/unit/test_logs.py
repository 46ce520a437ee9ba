"""JSON log lines carry the update id and version of any update they mention."""

from __future__ import annotations

import json
import logging

from weightsync.logs import JsonFormatter


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("rollout_side.receiver", logging.INFO, __file__, 1, message, args, None)


def test_update_lines_get_update_id_and_version_fields() -> None:
    line = JsonFormatter().format(record("update %s: committed version %d in %.3f s", "v12-3fa9c1e2b7d0", 12, 0.01))
    entry = json.loads(line)
    assert entry["update_id"] == "v12-3fa9c1e2b7d0" and entry["version"] == 12
    assert entry["level"] == "INFO" and entry["message"].startswith("update v12-3fa9c1e2b7d0: committed")


def test_other_lines_are_plain_json() -> None:
    entry = json.loads(JsonFormatter().format(record("rollout listening on %s", "127.0.0.1:50051")))
    assert "update_id" not in entry and entry["message"] == "rollout listening on 127.0.0.1:50051"
