"""Structured logs: one JSON object (or key=value line) per event.

Callers pass fields with ``extra={"fields": {...}}``. Only ids, positions, counts and class
names go in: never a record's personal fields, a body, or a secret (SecretStr renders masked).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

LOGGER_NAME = "auto_trace"

#: The stage a thread (or asyncio task) works for: every line it logs names it, so `--role all`
#: logs can be told apart without each call passing it.
_stage: ContextVar[str | None] = ContextVar("auto_trace_stage", default=None)


def set_stage(name: str) -> None:
    _stage.set(name)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        stage = _stage.get()
        if stage is not None:
            payload["stage"] = stage
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            # The class only: exception messages from foreign libraries may quote values.
            payload["exc_class"] = record.exc_info[0].__name__
        return json.dumps(payload, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = dict(getattr(record, "fields", None) or {})
        stage = _stage.get()
        if stage is not None:
            fields = {"stage": stage, **fields}
        if record.exc_info and record.exc_info[0] is not None:
            fields["exc_class"] = record.exc_info[0].__name__
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        return f"{stamp} {record.levelname:<7} {record.name} {record.getMessage()} {extra}".rstrip()


def configure(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger(LOGGER_NAME)
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
