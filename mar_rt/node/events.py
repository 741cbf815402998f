"""Structured logs: one JSON object per line per event, on the ``mar_rt.node`` logger.

Every record has ``ts`` (UTC, ISO 8601), ``event`` (a short snake_case name) and the event's
own fields.  The node also appends the same lines to ``<spool>/logs/node.jsonl`` so that
``mar-rt node status`` and an operator can read them after the fact.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any

LOGGER_NAME = "mar_rt.node"
log = logging.getLogger(LOGGER_NAME)


def _default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return repr(value)


def event_line(event: str, **fields: Any) -> str:
    """The JSON line of ``event`` (``ts`` and ``event`` first)."""
    ts = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
    return json.dumps({"ts": ts, "event": event, **fields}, default=_default, ensure_ascii=False)


def emit(event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``event`` with ``fields`` as one JSON line."""
    if log.isEnabledFor(level):
        log.log(level, event_line(event, **fields))


class JsonLinesFormatter(logging.Formatter):
    """Pass the node's JSON lines through; wrap any other record into one."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name.startswith(LOGGER_NAME) and message.startswith("{"):
            return message
        fields: dict[str, Any] = {"logger": record.name, "level": record.levelname}
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return event_line("log", message=message, **fields)


def install_handlers(log_file: Path | None, *, stream: bool = True) -> list[logging.Handler]:
    """Send the node's records (and warnings from elsewhere) as JSON lines to stderr and
    ``log_file``; returns the handlers added, so a caller can remove them."""
    handlers: list[logging.Handler] = []
    if stream:
        handlers.append(logging.StreamHandler())
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    root = logging.getLogger()
    for handler in handlers:
        handler.setFormatter(JsonLinesFormatter())
        root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    return handlers
