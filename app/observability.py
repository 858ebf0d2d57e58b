"""Per-request observability: request ids, the request log line, metrics, and `Server-Timing`.

`ObservabilityMiddleware` is pure ASGI (SSE responses stream through it untouched). For each HTTP request
it adopts the caller's `X-Request-ID` (sanitized) or makes one, returns it in the response, and answers
with a `Server-Timing` header that splits the time so far into the gateway's own work (`gateway`), HTTP
calls to Kling (`kling`) and waiting for a task or for free Kling slots (`wait`). A streamed (SSE) response
sends its headers first, so its `Server-Timing` covers the time until the stream started. When the
response is complete it logs one line and records the request's metrics.

Deeper code adds to the same request through `kling_call`, `waiting` and `tool_call`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import REQUEST_LOGGER, RequestContext, current_request
from app.metrics import (
    GATEWAY_ADDED_SECONDS,
    HTTP_REQUEST_SECONDS,
    HTTP_REQUESTS,
    KLING_REQUEST_SECONDS,
    KLING_REQUESTS,
    TOOL_CALL_SECONDS,
    TOOL_CALLS,
    WAITERS,
)
from app.tracing import describe_request, end_kling_span, kling_span, request_span

logger = logging.getLogger(REQUEST_LOGGER)
T = TypeVar("T")

MAX_REQUEST_ID_CHARS = 64
_REQUEST_ID_JUNK = re.compile(r"[^A-Za-z0-9._:-]")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Probes and scrapes would drown the request log; they are still counted in the metrics.
_QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
CLIENT_CLOSED = 499  # the status nginx logs for a caller that hung up before the answer


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's X-Request-ID, stripped to safe characters and bounded, or a new one."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            cleaned = _REQUEST_ID_JUNK.sub("", value.decode("latin-1"))[:MAX_REQUEST_ID_CHARS]
            if cleaned:
                return cleaned
    return uuid.uuid4().hex


def route_of(scope: Scope) -> str:
    """The matched route's template (`/tasks/{task_id}`), never the raw path: labels stay bounded."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    return template if isinstance(template, str) and template else "unmatched"


def server_timing(request: RequestContext, now: float) -> str:
    own, kling, wait = request.own_seconds(now), request.kling_s, request.wait_s
    return f"gateway;dur={own * 1000:.2f}, kling;dur={kling * 1000:.2f}, wait;dur={wait * 1000:.2f}"


class _ObservedSend:
    """A request's `send`: the answer's head gets the request id and `Server-Timing`, and its status is noted
    (CLIENT_CLOSED until it is sent). An object rather than a closure: every waiting caller holds one, and a
    closure over three variables is five objects for the garbage collector to walk."""

    __slots__ = ("_request", "_send", "status")

    def __init__(self, request: RequestContext, send: Send) -> None:
        self._request = request
        self._send = send
        self.status = CLIENT_CLOSED

    async def __call__(self, message: Message) -> None:
        request = self._request
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = [*message.get("headers", ()), (b"x-request-id", request.request_id.encode()),
                       (b"server-timing", server_timing(request, time.perf_counter()).encode())]  # fmt: skip
            message = {**message, "headers": headers}
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            request.finished = True
        await self._send(message)


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        request = RequestContext(request_id_from(scope["headers"]), scope["method"])
        token = current_request.set(request)
        observed = _ObservedSend(request, send)
        # The log line is written inside the span, so it carries the trace id.
        with request_span(scope, untraced=_QUIET_ROUTES) as span:
            try:
                await self._app(scope, receive, observed)
            except Exception:
                if observed.status == CLIENT_CLOSED:
                    observed.status = 500  # answered by the server's error handler
                raise
            finally:
                request.finished = True
                current_request.reset(token)
                self._record(request, scope, observed.status)
                describe_request(span, request, observed.status)

    @staticmethod
    def _record(request: RequestContext, scope: Scope, status: int) -> None:
        now = time.perf_counter()
        request.route = route_of(scope)
        method = request.method if request.method in _METHODS else "OTHER"
        elapsed = now - request.started
        HTTP_REQUESTS.labels(method, request.route, str(status)).inc()
        HTTP_REQUEST_SECONDS.labels(method, request.route).observe(elapsed)
        GATEWAY_ADDED_SECONDS.labels(request.route).observe(request.own_seconds(now))
        if request.route in _QUIET_ROUTES:
            return
        line = {
            "request_id": request.request_id,
            "tenant_id": request.tenant_id,
            "method": request.method,
            "route": request.route,
            "tool": request.tool,
            "status": status,
            "latency_ms": round(elapsed * 1000, 2),
            "gateway_ms": round(request.own_seconds(now) * 1000, 2),
            "kling_ms": round(request.kling_s * 1000, 2),
            "wait_ms": round(request.wait_s * 1000, 2),
            "kling_task_id": request.kling_task_id,
            "kling_code": request.kling_code,
        }
        fields = {key: value for key, value in line.items() if value is not None}
        what = f"{request.tool} " if request.tool else ""
        logger.info("%s %s %s-> %d", request.method, request.route, what, status, extra={"request": fields})


class KlingCall:
    """One HTTP call to Kling, as `kling_call` measures it; `answered` names the task it was about."""

    def __init__(self) -> None:
        self.code = "cancelled"
        self.task_id: str | None = None

    def answered(self, code: int, task_id: str | None) -> None:
        self.code = str(code)
        self.task_id = task_id


@contextlib.contextmanager
def kling_call(endpoint: str, failure_code: Callable[[BaseException], str]) -> Iterator[KlingCall]:
    """Time one HTTP call to Kling: counted by endpoint and Kling code (`failure_code` names a failure),
    booked to the current request's `kling` time, its task id and code kept for the request's log, and
    traced as a span when tracing is on."""
    call = KlingCall()
    span = kling_span(endpoint)
    started = time.perf_counter()
    try:
        yield call
    except BaseException as exc:
        call.code = failure_code(exc)
        raise
    finally:
        elapsed = time.perf_counter() - started
        end_kling_span(span, call.code, call.task_id)
        KLING_REQUESTS.labels(endpoint, call.code).inc()
        KLING_REQUEST_SECONDS.labels(endpoint).observe(elapsed)
        request = current_request.get()
        if request is not None and not request.finished:
            request.add_kling_time(elapsed)
            request.kling_task_id = call.task_id or request.kling_task_id
            if call.code.isdigit():
                request.kling_code = int(call.code)


class Waiting:
    """Around time spent waiting, not working: for a task to finish (`waiter=True` also counts the caller
    in `kgw_waiters`), for free Kling slots, or out a retry's backoff. Booked as the request's `wait`.
    A class, not a generator: one object held by each waiting caller instead of a generator and its wrapper."""

    __slots__ = ("_started", "_waiter")

    def __init__(self, *, waiter: bool = True) -> None:
        self._waiter = waiter
        self._started = 0.0

    def __enter__(self) -> None:
        if self._waiter:
            WAITERS.inc()
        self._started = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        if self._waiter:
            WAITERS.dec()
        request = current_request.get()
        if request is not None:
            request.add_wait_time(time.perf_counter() - self._started)


async def tool_call(tool: str, work: Callable[[], Awaitable[T]]) -> T:
    """Run the body of MCP tool `tool`: counted by tool and outcome (the task's status, or the error's type),
    timed, and the tool named on the request's log line."""
    request = current_request.get()
    if request is not None:
        request.tool = tool
    started = time.perf_counter()
    outcome = "cancelled"
    try:
        result = await work()
        status = getattr(getattr(result, "record", None), "status", None)
        outcome = str(getattr(status, "value", "ok"))
        return result
    except Exception as exc:
        outcome = str(getattr(exc, "type", type(exc).__name__))
        raise
    finally:
        TOOL_CALLS.labels(tool, outcome).inc()
        TOOL_CALL_SECONDS.labels(tool).observe(time.perf_counter() - started)
