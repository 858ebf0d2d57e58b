"""The pooled outbound client (app/http_pool.py) against real servers on loopback: one that drops kept-alive
connections, as Kling's load balancers do when a connection idles, and one behind TLS."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from pathlib import Path

import anyio
import httpcore2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app.http_pool import TIMEOUTS, create_http_client, create_kling_pool
from tests.servers import loopback_server

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[False, True], ids=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Both event loops: `serve` runs on uvloop, whose transports (TLS included) are its own code."""
    return "asyncio", {"use_uvloop": request.param}


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
    async with loopback_server(dropping.serve) as port, create_http_client() as http:
        with anyio.fail_after(10):
            first = await http.get(f"http://127.0.0.1:{port}/v1/images/generations/1")
            await dropping.hung_up.wait()  # the server's FIN is now in the idle pooled socket
            second = await http.get(f"http://127.0.0.1:{port}/v1/images/generations/1")
    assert (first.json(), second.json()) == ({"code": 0}, {"code": 0})
    assert dropping.connections == 2  # the dead connection was noticed before use, not written to


async def test_bytes_a_server_sends_on_an_idle_connection_are_never_read_as_the_next_answer() -> None:
    """A server that answers, then sends a 408 on the idle connection without hanging up: the next request goes
    on a new connection, so its answer is its own and not that stray 408 (nor, through a proxy, someone else's)."""
    first_answered, stray_sent = asyncio.Event(), asyncio.Event()
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(RESPONSE)
                await writer.drain()
                if connections == 1:
                    await first_answered.wait()
                    writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    stray_sent.set()
                    await reader.read()  # until the client drops the connection
        finally:
            writer.close()

    async with loopback_server(serve) as port:
        url = f"http://127.0.0.1:{port}/v1/images/generations/1"
        async with create_http_client() as http:
            with anyio.fail_after(10):
                first = await http.get(url)
                first_answered.set()
                await stray_sent.wait()
                second = await http.get(url)
    assert (first.status_code, second.status_code) == (200, 200)
    assert connections == 2


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

    async with loopback_server(keep_alive) as port, create_http_client() as http:
        with anyio.fail_after(10):
            answers = [(await http.get(f"http://127.0.0.1:{port}/x")).status_code for _ in range(3)]
    assert answers == [200, 200, 200]
    assert connections == 1


def self_signed_tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting only that server's certificate) for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return server, ssl.create_default_context(cadata=cert_pem.decode())


async def test_kling_calls_run_over_verified_tls(tmp_path: Path) -> None:
    """The pool's own TLS (in the event loop's transport): answers over one kept connection, and a server whose
    certificate the client does not trust is refused before anything is sent."""
    server_tls, trusting = self_signed_tls(tmp_path)
    requests = connections = 0

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests, connections
        connections += 1
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                while await reader.readuntil(b"\r\n\r\n"):
                    requests += 1
                    writer.write(RESPONSE)
                    await writer.drain()
        finally:
            writer.close()

    async with loopback_server(keep_alive, tls=server_tls) as port:
        url = f"https://127.0.0.1:{port}/v1/images/generations/1"
        extensions = {"timeout": TIMEOUTS}
        with anyio.fail_after(10):
            async with create_kling_pool(ssl_context=trusting) as pool:
                answers = [await pool.request("GET", url, extensions=extensions) for _ in range(2)]
                kept = connections  # one, when the first connection served both
            async with create_kling_pool() as pool:  # certifi's roots: the self-signed server is not trusted
                with pytest.raises(httpcore2.ConnectError):
                    await pool.request("GET", url, extensions=extensions)
    assert [(answer.status, answer.content) for answer in answers] == [(200, b'{"code":0}\n')] * 2
    assert (requests, kept) == (2, 1)


async def test_a_server_that_never_answers_the_tls_handshake_is_a_connect_timeout() -> None:
    """So a Kling call reads it as "timed out" (504), not as a refused connection."""
    silent_connections: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent_connections.append(writer)  # accepts TCP, never speaks TLS

    async with loopback_server(silent) as port:
        url = f"https://127.0.0.1:{port}/v1/images/generations/1"
        try:
            with anyio.fail_after(10):
                async with create_kling_pool() as pool:
                    with pytest.raises(httpcore2.ConnectTimeout):
                        await pool.request("GET", url, extensions={"timeout": {**TIMEOUTS, "connect": 0.2}})
        finally:
            for writer in silent_connections:
                writer.close()


async def test_a_connection_given_up_while_sending_is_closed_not_left_open() -> None:
    """A body the server stops reading times the write out; the connection is then dropped with what was still
    queued, not kept open until the server reads all of it (one that stopped reading never will)."""
    body_bytes = 64 << 20
    received = 0
    gone, timed_out = asyncio.Event(), asyncio.Event()

    async def stops_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await reader.readuntil(b"\r\n\r\n")
        await timed_out.wait()
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(1 << 20):  # what was in flight, until the client's close
                received += len(chunk)
        gone.set()
        writer.close()

    async with loopback_server(stops_reading) as port:
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        with anyio.fail_after(20):
            async with create_kling_pool() as pool:
                with pytest.raises(httpcore2.WriteTimeout):
                    await pool.request("POST", url, content=b"x" * body_bytes,
                                       extensions={"timeout": {**TIMEOUTS, "write": 0.2}})  # fmt: skip
                timed_out.set()
                await gone.wait()
    assert received < body_bytes // 2  # only the sockets' buffers, not the rest of the body
