"""The process's pooled outbound HTTP connections: httpcore2's pool (httpx2's transport) on asyncio's own
streams.

Kling calls go straight to the pool (`create_kling_pool`): httpx2's client layer (its request and response
models, cookies, auth and redirect flows) cost a third of each call's CPU here and gives Kling's small JSON
calls nothing. Everything else that fetches (webhooks, previews, OAuth keys) uses an httpx2 client over the
same kind of pool (`create_http_client`).

The pool's network backend is `AsyncioBackend` rather than httpcore2's default, anyio. Through anyio every read
and write enters a cancel scope for its timeout, TLS runs in Python over memory buffers, and the pool's check
of each idle connection (is its socket readable, as it is once the server hung up) rebuilds a dict of the
stream's attributes. On asyncio's streams a read is an await with a timer, TLS runs in the event loop's
transport (uvloop's, in C, under `serve`), and the check asks the stream and the socket directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import select
import socket
import ssl
from collections.abc import Iterable, Sequence
from typing import Any

import aiohappyeyeballs
import httpcore2
import httpx2
from httpcore2._exceptions import map_exceptions

# httpcore2's exceptions for each phase, as its anyio backend maps them; OSError covers resets and refusals.
_READ_ERRORS: dict[type[Exception], type[Exception]] = {TimeoutError: httpcore2.ReadTimeout,
                                                        OSError: httpcore2.ReadError}  # fmt: skip
_WRITE_ERRORS: dict[type[Exception], type[Exception]] = {TimeoutError: httpcore2.WriteTimeout,
                                                         OSError: httpcore2.WriteError}  # fmt: skip
# uvloop can fail a connect with a RuntimeError ("File descriptor ... is used by transport"), aiohappyeyeballs notes.
_CONNECT_ERRORS: dict[type[Exception], type[Exception]] = {TimeoutError: httpcore2.ConnectTimeout,
                                                           OSError: httpcore2.ConnectError,
                                                           RuntimeError: httpcore2.ConnectError}  # fmt: skip
# RFC 8305's recommended wait before racing the next address of a name that has several.
HAPPY_EYEBALLS_DELAY_S = 0.25
# Writes are held (see AsyncioStream.write) until a read, or until this many bytes wait: a typical Kling create is
# a few hundred bytes, an inline reference image up to ~10 MB, which is better sent as it is written.
COALESCE_BYTES = 64 * 1024
_EXTRA_INFO = {"client_addr": "sockname", "server_addr": "peername", "ssl_object": "ssl_object", "socket": "socket"}


class BufferedReader(asyncio.StreamReader):
    """asyncio's reader, telling whether it holds bytes nobody asked for. The transport reads as bytes arrive, so
    what a server sends on an idle connection (a 408 before it hangs up, say) waits here, not in the socket."""

    _buffer: bytearray  # asyncio's own, not in its type stubs

    def holds_unread(self) -> bool:
        return bool(self._buffer)


class AsyncioStream(httpcore2.AsyncNetworkStream):
    """One connection as asyncio's reader and writer pair, in httpcore2's stream interface, for HTTP/1.1 (the
    pools here never speak HTTP/2, nor hand a stream out for an upgrade): small writes are held until the next
    read, which over HTTP/1.1 always follows from the same request."""

    def __init__(self, reader: BufferedReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._socket: socket.socket = writer.get_extra_info("socket")
        # The pool asks whether an idle connection is readable twice per request it sends, of each idle connection:
        # one poll set made for the connection's socket answers in a third of the time of httpcore2's
        # `is_socket_readable`, which builds and fills a new one every time.
        self._fd = self._socket.fileno()
        self._readable = select.poll()
        self._readable.register(self._fd, select.POLLIN)
        self._unsent: list[bytes] = []
        self._write_timeout: float | None = None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._unsent:
            # A send that fails is left to the read to report, as httpcore2 does for a failed write: the server
            # may have answered (an error) and closed, and that answer, or its hang-up, is what the caller needs.
            with contextlib.suppress(httpcore2.WriteError):
                await self._send_unsent()
        with map_exceptions(_READ_ERRORS):
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # httpcore2 writes a request's head and its body apart, then reads the answer. Held until that read,
        # a request leaves in one send: one system call and one TCP segment (one TLS record) instead of two,
        # and the server reads it whole at once. A write of COALESCE_BYTES or more goes out at once.
        if not buffer:
            return
        self._unsent.append(buffer)
        self._write_timeout = timeout
        if sum(map(len, self._unsent)) >= COALESCE_BYTES:  # a head and a body at most
            await self._send_unsent()

    async def _send_unsent(self) -> None:
        unsent, self._unsent = self._unsent, []
        with map_exceptions(_WRITE_ERRORS):
            if self._writer.is_closing():
                raise ConnectionResetError("the connection is closed")
            self._writer.writelines(unsent)  # uvloop sends the parts together without joining (copying) them
            if self._writer.transport.get_write_buffer_size():  # only then can the write have to wait
                async with asyncio.timeout(self._write_timeout):
                    await self._writer.drain()

    async def aclose(self) -> None:
        # Not waiting for the peer: a close must not hang on a stalled server. And a close with bytes still to
        # send would wait for the server to read them (for ever, from one that stopped): those are dropped.
        self._writer.close()
        if self._writer.transport.get_write_buffer_size():
            self._writer.transport.abort()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore2.AsyncNetworkStream:
        with map_exceptions(_CONNECT_ERRORS):  # ssl.SSLError is an OSError: a ConnectError
            # Our own deadline: the loop's handshake timeout fails with ConnectionAbortedError, which would read
            # as a refused connection rather than one that timed out.
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        return self  # the same reader now reads the decrypted bytes

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # An idle connection with anything to read is one the server ended (its EOF, or a last error
            # answer before closing) or garbled: the transport may have taken it in already, else the socket
            # shows it. Such bytes must never be read as the answer to the next request.
            reader = self._reader
            # A closed socket's number may be another's by now: closed, it reads as ended, as in httpcore2's check.
            return (
                reader.holds_unread()
                or reader.at_eof()
                or self._writer.is_closing()
                or self._socket.fileno() != self._fd
                or bool(self._readable.poll(0))
            )
        return self._writer.get_extra_info(_EXTRA_INFO.get(info, info))


async def _addresses(loop: asyncio.AbstractEventLoop, host: str, port: int) -> Sequence[aiohappyeyeballs.AddrInfoType]:
    """Where to connect. An address literal needs no lookup: the loop's getaddrinfo would still take a trip
    through its thread pool, per connection (the simulator, a proxy, a private endpoint are often literals)."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        return await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    infos = aiohappyeyeballs.addr_to_addr_infos((str(literal), port))
    assert infos is not None
    return infos


class AsyncioBackend(httpcore2.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        with map_exceptions(_CONNECT_ERRORS):
            async with asyncio.timeout(timeout):
                addresses = await _addresses(loop, host, port)
                local = None if local_address is None else await _addresses(loop, local_address, 0)
                # uvloop's own connect takes no happy-eyeballs delay: a blackholed IPv6 address would eat
                # the whole connect timeout before IPv4 is tried.
                sock = await aiohappyeyeballs.start_connection(
                    addresses, local_addr_infos=local, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY_S
                )
                try:
                    for option in socket_options or ():
                        sock.setsockopt(*option)
                    reader = BufferedReader(loop=loop)
                    transport, protocol = await loop.create_connection(
                        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), sock=sock
                    )
                    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
                except BaseException:
                    sock.close()
                    raise
        return AsyncioStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# Per phase; callers bound each whole call too, since a slow drip of bytes never trips a per-phase timeout.
TIMEOUTS = {"connect": 5.0, "read": 30.0, "write": 10.0, "pool": 2.0}


@functools.cache
def verified_tls() -> ssl.SSLContext:
    """One TLS context (certifi's roots) for every pool of the process: each costs ~35 ms to build, and a
    context is shared safely by any number of connections."""
    return httpx2.create_ssl_context(trust_env=False)


# How long an idle connection is kept for reuse. httpcore2's pool walks every connection it holds twice per request
# (to assign it, and as its answer is closed), a few µs each: after a burst of 50 concurrent calls, 50 idle
# connections kept 30 s made each later call cost 180 µs more CPU (and 0.2 ms more latency at p50) for those 30 s
# (`python -m bench.compare BASE --after-burst`). Kept 5 s (httpx's default), the pool shrinks to what the last few
# seconds needed: it hands out the connections it holds first, so the rest fall idle and go. The price is a new
# connection (a TLS handshake) for a call after 5 s without any, where a task in flight is polled every second or so.
KEEPALIVE_EXPIRY_S = 5.0


def _limits(max_connections: int) -> httpx2.Limits:
    return httpx2.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections // 2,
        keepalive_expiry=KEEPALIVE_EXPIRY_S,
    )


def _asyncio_pool(limits: httpx2.Limits, ssl_context: ssl.SSLContext) -> httpcore2.AsyncConnectionPool:
    return httpcore2.AsyncConnectionPool(
        ssl_context=ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=AsyncioBackend(),
    )


def create_kling_pool(
    max_connections: int = 100, ssl_context: ssl.SSLContext | None = None
) -> httpcore2.AsyncConnectionPool:
    """The pool Kling calls are sent on (pass `extensions={"timeout": TIMEOUTS}` with each request). TLS is
    verified against certifi's roots unless `ssl_context` says otherwise (a private CA in front of Kling)."""
    return _asyncio_pool(_limits(max_connections), ssl_context or verified_tls())


class PooledTransport(httpx2.AsyncHTTPTransport):
    """httpx2's transport with the pool rebuilt on `AsyncioBackend`: httpx2 takes no network backend itself."""

    def __init__(self, limits: httpx2.Limits) -> None:
        super().__init__(verify=verified_tls(), limits=limits, trust_env=False)
        self._pool = _asyncio_pool(limits, verified_tls())


def create_http_client(max_connections: int = 100) -> httpx2.AsyncClient:
    """A pooled client for callers' receivers and other fetches. Per-phase timeouts here; each call adds a
    deadline of its own."""
    return httpx2.AsyncClient(
        timeout=httpx2.Timeout(**TIMEOUTS),
        transport=PooledTransport(_limits(max_connections)),
        follow_redirects=False,
        trust_env=False,
    )
