"""The process's pooled outbound HTTP connections: httpcore2's pool (httpx2's transport), with a cheaper
idle-connection check.

Kling calls go straight to the pool (`create_kling_pool`): httpx2's client layer (its request and response
models, cookies, auth and redirect flows) cost a third of each call's CPU here and gives Kling's small JSON
calls nothing. Everything else that fetches (webhooks, previews, OAuth keys) uses an httpx2 client over the
same kind of pool (`create_http_client`).

httpcore2 re-scans every pooled connection each time a request joins or leaves the pool, and asks each idle
one whether its socket is readable (a server that closed a kept-alive connection makes it readable). Through
anyio that question rebuilds a dict of the stream's attributes per connection per scan: with a few dozen
connections to Kling it was a third of a worker's time under load (docs/benchmarks.md, profile). The streams
here answer it from the socket they keep, with one `poll`; everything else is anyio's, unchanged.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore2
import httpx2
from httpcore2._utils import is_socket_readable


class ProbedStream(httpcore2.AsyncNetworkStream):
    """An anyio stream that answers `is_readable` from the socket it keeps instead of anyio's attribute lookup."""

    def __init__(self, stream: httpcore2.AsyncNetworkStream, sock: socket.socket | None) -> None:
        self._stream = stream
        self._socket = sock

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore2.AsyncNetworkStream:
        # TLS runs over the same TCP socket, so it is still the one to probe.
        return ProbedStream(await self._stream.start_tls(ssl_context, server_hostname, timeout), self._socket)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return is_socket_readable(self._socket)  # httpcore2's own check, on the socket kept here
        return self._stream.get_extra_info(info)


class ProbedBackend(httpcore2.AsyncNetworkBackend):
    """httpcore2's own anyio backend, its streams wrapped in `ProbedStream`."""

    def __init__(self) -> None:
        self._backend = httpcore2.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        stream = await self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        return ProbedStream(stream, stream.get_extra_info("socket"))

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


# Per phase; callers bound each whole call too, since a slow drip of bytes never trips a per-phase timeout.
TIMEOUTS = {"connect": 5.0, "read": 30.0, "write": 10.0, "pool": 2.0}


def _limits(max_connections: int) -> httpx2.Limits:
    return httpx2.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections // 2, keepalive_expiry=30.0
    )


def _probed_pool(limits: httpx2.Limits, ssl_context: ssl.SSLContext) -> httpcore2.AsyncConnectionPool:
    return httpcore2.AsyncConnectionPool(
        ssl_context=ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=ProbedBackend(),
    )


def create_kling_pool(max_connections: int = 100) -> httpcore2.AsyncConnectionPool:
    """The pool Kling calls are sent on (pass `extensions={"timeout": TIMEOUTS}` with each request)."""
    return _probed_pool(_limits(max_connections), httpx2.create_ssl_context(trust_env=False))


class PooledTransport(httpx2.AsyncHTTPTransport):
    """httpx2's transport with the pool rebuilt on `ProbedBackend`: httpx2 takes no network backend itself."""

    def __init__(self, limits: httpx2.Limits) -> None:
        ssl_context = httpx2.create_ssl_context(trust_env=False)  # one, for both pools: each costs ~25 ms
        super().__init__(verify=ssl_context, limits=limits, trust_env=False)
        self._pool = _probed_pool(limits, ssl_context)


def create_http_client(max_connections: int = 100) -> httpx2.AsyncClient:
    """A pooled client for callers' receivers and other fetches. Per-phase timeouts here; each call adds a
    deadline of its own."""
    return httpx2.AsyncClient(
        timeout=httpx2.Timeout(**TIMEOUTS),
        transport=PooledTransport(_limits(max_connections)),
        follow_redirects=False,
        trust_env=False,
    )
