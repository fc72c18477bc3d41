"""Structured logs: one JSON object per line, the request id on every line a request causes.

``bind_request`` (called first thing in the public handler) puts the request's
id, method and path in a context variable; aiohttp runs each request in its own
task, so every line logged while handling it carries its ``request_id``. The
optional access log (``logging.access_log: true``) writes one ``gateway.access``
line per request, naming the caller only by a hash of its subject.

No credential is ever passed to a log call; as a second line of defence, anything
shaped like a bearer token, a JWT or an API key is masked in the finished line.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import sys
import time
from contextvars import ContextVar
from typing import Any

import orjson

from .settings import Logging

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_REQUEST: ContextVar[tuple[str, str, str] | None] = ContextVar("gateway_request", default=None)
_SECRET = re.compile(
    r"(?i:bearer)\s+[^\s\"',;]+"  # Authorization header values
    r"|eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*"  # JWTs (header.payload.signature)
    r"|gk_[A-Za-z0-9_-]{8,}"
)  # the gateway's API keys
MAX_PATH = 512
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Made request ids: a random per-process prefix and a counter, unique across processes and
# restarts without a system call per request.
_REQUEST_ID_PREFIX = os.urandom(6).hex()
_request_counter = itertools.count(1)

access_log = logging.getLogger("gateway.access")


def request_id_for(incoming: str | None) -> str:
    """The caller's ``X-Request-Id`` when it is a safe token, else a new id; every listener uses this."""
    if incoming is not None and _REQUEST_ID.fullmatch(incoming):
        return incoming
    return _REQUEST_ID_PREFIX + format(next(_request_counter), "012x")


def bind_request(request_id: str, method: str, path: str) -> None:
    """Make this request's id (and method, path) part of every line logged while handling it."""
    _REQUEST.set((request_id, method, path))


def current_request_id() -> str | None:
    bound = _REQUEST.get()
    return bound[0] if bound is not None else None


def subject_hash(subject: str | None) -> str | None:
    """Enough to tell callers apart and to find one in the audit trail; not the subject itself."""
    if not subject:
        return None
    return hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def log_access(*, status: int, decision: str, code: str, duration_s: float, subject: str | None) -> None:
    """One access line per request, when ``logging.access_log`` is on (the logger's level says)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    bound = _REQUEST.get()
    method, path = (bound[1], bound[2][:MAX_PATH]) if bound is not None else ("", "")
    access_log.info(
        "request",
        extra={
            "method": method,
            "path": path,
            "status": status,
            "decision": decision,
            "code": code,
            "duration_ms": round(duration_s * 1000, 3),
            "subject_hash": subject_hash(subject),
        },
    )


def redact(text: str) -> str:
    return _SECRET.sub("[redacted]", text)


class JsonFormatter(logging.Formatter):
    """A log record as one JSON line: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        request_id = current_request_id()
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return redact(orjson.dumps(entry, default=str).decode())


class TextFormatter(logging.Formatter):
    """For people at a terminal; the request id still leads each request's lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = current_request_id()
        return redact(f"[{request_id}] {line}" if request_id else line)


def setup_logging(settings: Logging) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    # The access log is its own switch: on, it writes at any configured level; off, never.
    access_log.setLevel(logging.INFO if settings.access_log else logging.CRITICAL + 1)
    # aiohttp logs every bad request a client sends at error level; they are the client's fault.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
