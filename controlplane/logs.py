"""Structured log lines: `ts level event key=value ...`, one per event, easy to grep."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

LOGGER_NAME = "switchyard"


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts = [f"{stamp}.{int(record.msecs):03d}Z", record.levelname.lower(), record.getMessage()]
        parts += [f"{key}={_quote(value)}" for key, value in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += " error=" + _quote(repr(record.exc_info[1]))
        return line


def _quote(value: Any) -> str:
    text = str(value)
    if not text or any(ch.isspace() or ch in '"=' for ch in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def setup(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger(LOGGER_NAME)
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}")


def event(logger: logging.Logger, name: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log a named event with its fields: `event(log, "weights.changed", model="m")`."""
    logger.log(level, name, extra={"fields": fields})
