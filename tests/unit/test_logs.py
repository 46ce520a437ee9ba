"""JSON log lines carry the update id and version of any update they mention."""

from __future__ import annotations

import json
import logging

from weightsync.logs import MAX_MESSAGE_CHARS, TEXT_FORMAT, JsonFormatter, TextFormatter, shown


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("rollout_side.update.receiver", logging.INFO, __file__, 1, message, args, None)


def test_update_lines_get_update_id_and_version_fields() -> None:
    line = JsonFormatter().format(record("update %s: committed version %d in %.3f s", "v12-3fa9c1e2b7d0", 12, 0.01))
    entry = json.loads(line)
    assert entry["update_id"] == "v12-3fa9c1e2b7d0" and entry["version"] == 12
    assert entry["level"] == "INFO" and entry["message"].startswith("update v12-3fa9c1e2b7d0: committed")


def test_other_lines_are_plain_json() -> None:
    entry = json.loads(JsonFormatter().format(record("rollout listening on %s", "127.0.0.1:50051")))
    assert "update_id" not in entry and entry["message"] == "rollout listening on 127.0.0.1:50051"


def test_a_callers_newline_cannot_forge_a_log_line() -> None:
    forged = "v2-abc\n2026-11-27 10:00:00,000 INFO    rollout_side.update.receiver: update v9-0: committed version 9"
    for formatter in (TextFormatter(TEXT_FORMAT), JsonFormatter()):
        line = formatter.format(record("update %s: receiving version %d", forged, 2))
        assert "\n" not in line and "\\n" in line


def test_messages_and_quoted_values_are_bounded() -> None:
    line = TextFormatter(TEXT_FORMAT).format(record("update %s: receiving", "x" * (10 * MAX_MESSAGE_CHARS)))
    assert len(line) < MAX_MESSAGE_CHARS + 200 and f"({10 * MAX_MESSAGE_CHARS + 18} characters)" in line
    assert shown("a\nb\x1b[2J") == repr("a\nb\x1b[2J") and "\n" not in shown("a\nb")
    long = shown("n" * 100_000)
    assert len(long) < 100 and long.endswith("... (100000 characters)")
