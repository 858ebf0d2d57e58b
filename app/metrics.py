"""Prometheus metrics: the families the gateway exports at `/metrics`, and how they are collected.

Labels are bounded by code or configuration: route templates (never raw paths), tool names, Kling
endpoints and codes, limit names, credential ids. Never a tenant's key, an access key or a secret.

With `serve --workers N` (N > 1) every worker writes its values to files in `PROMETHEUS_MULTIPROC_DIR`
(prometheus-client's multiprocess mode, chosen when that variable is set before the first metric is
built: `serve` sets it before uvicorn spawns the workers) and any worker's `/metrics` adds them all up.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import Request
from starlette.responses import Response

from app.redis_pool import BoundedConnectionPool

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
T = TypeVar("T")

# Latencies of whole requests and of Kling calls: from a cached answer to a long wait for images.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# The gateway's own work per request: sub-millisecond when healthy.
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

HTTP_REQUESTS = Counter(
    "kgw_http_requests", "HTTP requests answered, by route template and status", ("method", "route", "status")
)
HTTP_REQUEST_SECONDS = Histogram(
    "kgw_http_request_seconds", "Time from request to the end of the response", ("method", "route"),
    buckets=REQUEST_BUCKETS,
)  # fmt: skip
GATEWAY_ADDED_SECONDS = Histogram(
    "kgw_gateway_added_seconds",
    "Request time minus time spent on Kling HTTP calls and waiting for tasks or free Kling slots",
    ("route",),
    buckets=OVERHEAD_BUCKETS,
)
TOOL_CALLS = Counter("kgw_mcp_tool_calls", "MCP tool calls, by tool and outcome", ("tool", "outcome"))
TOOL_CALL_SECONDS = Histogram("kgw_mcp_tool_call_seconds", "MCP tool call duration", ("tool",),
                              buckets=REQUEST_BUCKETS)  # fmt: skip
KLING_REQUESTS = Counter(
    "kgw_kling_requests", "HTTP calls to Kling, by endpoint and Kling code (or how the call failed)",
    ("endpoint", "code"),
)  # fmt: skip
KLING_REQUEST_SECONDS = Histogram("kgw_kling_request_seconds", "Duration of HTTP calls to Kling", ("endpoint",),
                                  buckets=REQUEST_BUCKETS)  # fmt: skip
LIMITER_DECISIONS = Counter(
    "kgw_limiter_decisions", "Limit checks, by limit and result (admitted, refused, unavailable)", ("limit", "result")
)
LEASES_RETAKEN = Counter(
    "kgw_leases_retaken",
    "Leases of running tasks found lapsed (Redis lost them, or the replica stalled past their TTL) and taken again,"
    " by kind (tenant, kling_account)",
    ("kind",),
)
REDIS_ERRORS = Counter("kgw_redis_errors", "Redis commands or connections that failed, by kind", ("kind",))
# Gauges add up across live workers (a dead worker's share is dropped when it exits).
TASKS_IN_FLIGHT = Gauge(
    "kgw_tasks_in_flight", "Kling tasks this replica follows until they finish", multiprocess_mode="livesum"
)
WAITERS = Gauge("kgw_waiters", "Callers waiting for a task to finish", multiprocess_mode="livesum")
BREAKER_OPEN = Gauge(
    "kgw_breaker_open", "1 while calls to a Kling credential fail fast after repeated failures", ("credential",),
    multiprocess_mode="livemax",
)  # fmt: skip


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV)


async def metrics_endpoint(_: Request) -> Response:
    """`GET /metrics`: this process's metrics, or every worker's added up in multiprocess mode."""
    registry = REGISTRY
    if multiprocess_dir():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # prometheus-client is partly untyped
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def prepare_multiprocess_dir() -> tuple[str, bool]:
    """Point `PROMETHEUS_MULTIPROC_DIR` at an empty directory for this server's workers: the operator's
    (emptied: values of an earlier run would be added in) or a new one. Returns (path, created here)."""
    given = multiprocess_dir()
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        for stale in Path(given).glob("*.db"):
            stale.unlink()
        return given, False
    path = tempfile.mkdtemp(prefix="kgw-metrics-")
    os.environ[MULTIPROC_ENV] = path
    return path, True


def forget_dead_workers() -> None:
    """At a worker's start, drop the live-gauge shares of workers that died without exiting cleanly (killed,
    out of memory, then respawned by uvicorn): otherwise their last waiters and tasks would count forever."""
    path = multiprocess_dir()
    if not path:
        return
    for file in Path(path).glob("gauge_live*_*.db"):
        pid = file.stem.rpartition("_")[2]
        if pid.isdigit() and not _alive(int(pid)):
            mark_process_dead(int(pid), path)  # type: ignore[no-untyped-call]  # partly untyped, as above


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user holds the pid: not ours, but not to be swept either
    return True


def forget_this_process() -> None:
    """At a worker's exit, drop its share of the live gauges (a no-op with one process)."""
    path = multiprocess_dir()
    if path:
        mark_process_dead(os.getpid(), path)  # type: ignore[no-untyped-call]  # partly untyped, as above


def _redis_failure_kind(exc: BaseException) -> str | None:
    if isinstance(exc, NoScriptError):
        return None  # redis-py loads the script and runs it again: routine after a Redis restart
    if isinstance(exc, RedisTimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError | OSError):
        return "connection"
    return "response" if isinstance(exc, RedisError) else None


# Set while a failure is being counted further out: the pool's connect runs inside a command's retry (and
# a reconnect inside another retry), and one failure must count once, by the outermost of them.
_counting = contextvars.ContextVar("kgw_counting_redis_errors", default=False)


@contextlib.contextmanager
def _counting_redis_errors() -> Iterator[None]:
    if _counting.get():
        yield
        return
    token = _counting.set(True)
    try:
        yield
    except BaseException as exc:
        kind = _redis_failure_kind(exc)
        if kind is not None:
            REDIS_ERRORS.labels(kind).inc()
        raise
    finally:
        _counting.reset(token)


class CountingRetry(Retry):
    """redis-py's retry, counting each command that fails for good (after its retries)."""

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        with _counting_redis_errors():
            return await super().call_with_retry(do, fail, is_retryable, with_failure_count)


class CountingConnectionPool(BoundedConnectionPool):
    """A pool that counts failures to connect (or to get a connection in time): those happen before a
    command's retry loop, and are what a Redis outage looks like."""

    async def get_connection(self, *args: Any, **options: Any) -> AbstractConnection:
        with _counting_redis_errors():
            return await super().get_connection(*args, **options)
