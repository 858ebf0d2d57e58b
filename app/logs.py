"""Logging: one line per request on stdout, JSON for log pipelines, readable text on a terminal.

Request-scoped fields (request id, tenant, route or MCP tool, Kling task id and code, where the time went)
live in one `RequestContext` per request, reachable through the `current_request` contextvar, so code far
from the edge (the Kling client, the auth middleware) can add to it. Every record logged while a request
runs carries its request id and tenant.

Secrets never reach a log line by design (nothing logs headers or keys); as a second line of defence the
formatters mask anything shaped like a gateway API key, a bearer token or a JWT.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app.tracing import trace_ids

REQUEST_LOGGER = "app.requests"
_SECRET_SHAPES = re.compile(
    r"(?i)\bbearer\s+[^\s\"',]+"  # an Authorization header's value
    r"|\bkgw_[A-Za-z0-9_]{20,}"  # a gateway API key (key ids alone are shorter)
    r"|\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"  # a JWT
)


@dataclass
class RequestContext:
    """What one request did, filled in as it runs; shared (not copied) by the tasks serving it."""

    request_id: str
    method: str
    started: float = field(default_factory=time.perf_counter)
    route: str | None = None
    tenant_id: str | None = None
    tool: str | None = None
    kling_task_id: str | None = None
    kling_code: int | None = None
    kling_s: float = 0.0  # time spent in HTTP calls to Kling
    wait_s: float = 0.0  # time spent waiting for a task or for free Kling slots
    finished: bool = False  # set once the response is complete: later work is not this request's

    def add_kling_time(self, seconds: float) -> None:
        if not self.finished:
            self.kling_s += seconds

    def add_wait_time(self, seconds: float) -> None:
        if not self.finished:
            self.wait_s += seconds

    def own_seconds(self, now: float) -> float:
        """The gateway's own work so far: elapsed time minus time spent on Kling or waiting."""
        return max(0.0, now - self.started - self.kling_s - self.wait_s)


current_request: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("request", default=None)


def bind_tenant(tenant_id: str) -> None:
    request = current_request.get()
    if request is not None:
        request.tenant_id = tenant_id


def redact(text: str) -> str:
    return _SECRET_SHAPES.sub("[redacted]", text)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's own fields (the request's, for the request line, or the surrounding request's ids),
    and the current trace's ids when tracing is on."""
    fields = _request_fields(record)
    ids = trace_ids()
    return {**fields, **ids} if ids else fields


def _request_fields(record: logging.LogRecord) -> dict[str, Any]:
    given: dict[str, Any] | None = getattr(record, "request", None)
    if given is not None:
        return given
    request = current_request.get()
    if request is None:
        return {}
    return {key: value for key, value in (("request_id", request.request_id), ("tenant_id", request.tenant_id))
            if value is not None}  # fmt: skip


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(line, default=str, separators=(",", ":")))


class TextFormatter(logging.Formatter):
    """For a person at a terminal: time, level, message, then the fields as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        extras = " ".join(f"{key}={value}" for key, value in _fields(record).items())
        text = f"{stamp} {record.levelname:<7} {record.getMessage()}" + (f"  {extras}" if extras else "")
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return redact(text)


def logging_config(*, json_lines: bool | None = None, level: str = "INFO") -> dict[str, Any]:
    """`logging.config.dictConfig` settings (also uvicorn's `log_config`, applied in every worker): all
    records, uvicorn's included, go to stdout as JSON lines, or as text when stdout is a terminal. uvicorn's
    access log is off: the gateway writes its own line per request."""
    if json_lines is None:
        json_lines = not sys.stdout.isatty()
    formatter = "app.logs.JsonFormatter" if json_lines else "app.logs.TextFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"line": {"()": formatter}},
        "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "line", "stream": "ext://sys.stdout"}},
        "root": {"handlers": ["stdout"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": False},
            # One INFO line per outgoing request, with the full URL: a webhook URL can carry its receiver's
            # secret, and a line per Kling poll would drown the request log (and cost a quarter of the CPU).
            "httpx2": {"level": "WARNING"},
            "httpcore2": {"level": "WARNING"},
            "httpx": {"level": "WARNING"},
            "httpcore": {"level": "WARNING"},
        },
    }
