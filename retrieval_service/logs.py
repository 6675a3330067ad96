"""Structured logging of the retrieval service: JSON lines or text, every line tagged with the RPC's request id.

Each RPC gets a request id: the caller's `x-request-id` metadata when it is a plausible id (1-128 characters of
`[A-Za-z0-9._:-]`), else a new uuid4 hex. `retrieval_service.grpc.interceptors.RpcObserver` puts it (and the RPC's full
method name) into context variables at the start of the call and sends it back as initial metadata
`x-request-id`. Tasks created during the call copy the context (asyncio), so their lines carry the id too; work
run in thread pools does not (those lines have `request_id: null`).

`configure_logging("json")` writes one JSON object per line to stderr:

    {"ts": "2026-11-25T18:03:01.123Z", "level": "INFO", "logger": "vitrine.access",
     "message": "/vitrine.v1.RetrievalService/SearchImages OK 12.3 ms", "request_id": "9f1c...",
     "rpc": "/vitrine.v1.RetrievalService/SearchImages", "code": "OK", "duration_ms": 12.3,
     "peer": "ipv4:127.0.0.1:53210"}

Fields: ts (UTC, ISO 8601, ms), level, logger, message, request_id and rpc (null outside an RPC), every `extra=`
field of the call, and `exc` (the formatted traceback) when an exception is attached. `configure_logging("text")`
writes `2026-11-25 18:03:01,123 INFO vitrine.access [9f1c...] message`. Metadata (and so the `authorization`
header) is never logged.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import IO, Literal

REQUEST_ID_KEY = "x-request-id"
"""gRPC metadata key (lowercase, as gRPC requires) of the request id, read from the caller and sent back."""

LogFormat = Literal["json", "text"]

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("vitrine_request_id", default=None)
rpc_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("vitrine_rpc", default=None)

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# Attributes every LogRecord has; anything else on a record came from `extra=` and is written as a field.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_INSTALLED = "_vitrine_handler"  # marks the root handler installed by configure_logging


def new_request_id() -> str:
    """A fresh request id: uuid4 as 32 lowercase hex characters."""
    return uuid.uuid4().hex


def request_id_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The caller's `x-request-id` if it is 1-128 characters of [A-Za-z0-9._:-], else `new_request_id()`.

    Anything else (too long, other characters, binary) is replaced rather than logged, so a caller cannot inject
    text into log lines.
    """
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _VALID_REQUEST_ID.fullmatch(value):
            return value
    return new_request_id()


def bind_request(request_id: str, rpc: str) -> None:
    """Tag every log line of the current context (the RPC's task and tasks it creates) with the id and RPC."""
    request_id_var.set(request_id)
    rpc_var.set(rpc)


class RequestContextFilter(logging.Filter):
    """Adds `request_id` and `rpc` (from the context variables, or None) to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Set record.request_id / record.rpc unless the caller passed them in `extra`; never drops a record."""
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        if not hasattr(record, "rpc"):
            record.rpc = rpc_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the fields); non-JSON values become str()."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as a single line of JSON (newlines inside values are escaped)."""
        ts = datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds")
        entry: dict[str, object] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "rpc": getattr(record, "rpc", None),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        return super().format(record)


def make_handler(log_format: LogFormat, stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (stderr by default) writing `log_format` lines tagged with request id and RPC.

    Raises:
        ValueError: `log_format` is neither "json" nor "text".
    """
    if log_format not in ("json", "text"):
        raise ValueError(f"log_format must be 'json' or 'text', got {log_format!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else _TextFormatter(_TEXT_FORMAT))
    return handler


def configure_logging(log_format: LogFormat = "text", level: int | str = logging.INFO,
                      stream: IO[str] | None = None) -> logging.Handler:
    """Make the root logger write `log_format` lines at `level` and above; return the installed handler.

    Replaces the handler a previous call installed and handlers `logging.basicConfig` added (StreamHandlers on
    stderr/stdout); other handlers (e.g. pytest's capture) stay.

    Raises:
        ValueError: unknown `log_format` or `level` name.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _INSTALLED, False) or (
            type(old) is logging.StreamHandler and getattr(old, "stream", None) in (sys.stderr, sys.stdout)
        ):
            root.removeHandler(old)
    handler = make_handler(log_format, stream)
    setattr(handler, _INSTALLED, True)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
