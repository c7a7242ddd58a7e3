"""Structured logs for moeray's loggers, the same in every process (router and engine replicas).

`setup_logging()` gives the `moeray` logger (every module's `logging.getLogger(__name__)` is
below it) one handler on stderr that writes one JSON object per line:

    {"ts": "2026-11-30T10:00:00.123+00:00", "level": "WARNING", "logger": "moeray.router.service",
     "request_id": "cmpl-...", "message": "..."}

plus "exception" (the traceback) only when a record carries one: refusals, cancels and lost
engines are logged without tracebacks, at WARNING at most. The request id comes from the
record's `extra={"request_id": ...}`, else from `REQUEST_ID`, a context variable the router sets
for the request being served (each request runs in its own asyncio task, hence its own context).

It is called where the app makes its replicas (cluster/app.py: Ray's `worker_process_setup_hook`
for engine replicas, `FrontDoor.__init__` for router replicas). Idempotent. This
module imports nothing from moeray, so any layer may use it.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys

#: The id of the request this task is serving (set by the router per request).
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "moeray_request_id", default=None
)
_MARK = "_moeray_structured"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, request_id, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
        out = {
            "ts": ts.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", None) or REQUEST_ID.get(),
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(level: str | int = "INFO") -> None:
    """Structured lines for the `moeray` logger at `level`, on stderr (idempotent; records do
    not also go to the root logger's handlers, so nothing is printed twice)."""
    logger = logging.getLogger("moeray")
    logger.setLevel(level)
    if any(getattr(h, _MARK, False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    setattr(handler, _MARK, True)
    logger.addHandler(handler)
    logger.propagate = False
