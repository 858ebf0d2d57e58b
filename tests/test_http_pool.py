"""The pooled outbound client (app/http_pool.py) against a real HTTP server on loopback that drops kept-alive
connections, as Kling's load balancers do when a connection idles."""

from __future__ import annotations

import asyncio
import contextlib

import anyio
import pytest

from app.http_pool import create_http_client

pytestmark = pytest.mark.anyio

RESPONSE = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"code":0}\n'


class DroppingServer:
    """Answers one request per connection as if keeping it alive (no `Connection: close`), then hangs up."""

    def __init__(self) -> None:
        self.connections = 0
        self.hung_up = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(RESPONSE)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        self.hung_up.set()


async def test_a_connection_the_server_dropped_while_idle_is_not_reused() -> None:
    dropping = DroppingServer()
    server = await asyncio.start_server(dropping.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with create_http_client() as http:
            with anyio.fail_after(10):
                first = await http.get(f"http://127.0.0.1:{port}/v1/images/generations/1")
                await dropping.hung_up.wait()  # the server's FIN is now in the idle pooled socket
                second = await http.get(f"http://127.0.0.1:{port}/v1/images/generations/1")
    finally:
        server.close()
        await server.wait_closed()
    assert (first.json(), second.json()) == ({"code": 0}, {"code": 0})
    assert dropping.connections == 2  # the dead connection was noticed before use, not written to


async def test_a_kept_alive_connection_is_reused() -> None:
    connections = 0

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):  # the client closing its pool
                while await reader.readuntil(b"\r\n\r\n"):
                    writer.write(RESPONSE)
                    await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(keep_alive, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with create_http_client() as http:
            with anyio.fail_after(10):
                answers = [(await http.get(f"http://127.0.0.1:{port}/x")).status_code for _ in range(3)]
    finally:
        server.close()
        await server.wait_closed()
    assert answers == [200, 200, 200]
    assert connections == 1
