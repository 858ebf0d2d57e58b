"""A minimal HTTP/1.1 keep-alive client on raw asyncio streams, for load generation.

A full client (httpx2) spends more CPU per request than the servers under test, and the client shares the
machine's two cores with them; this one spends little, so what is measured is mostly the server. It speaks
only what the benchmarks need: one request at a time per connection, Content-Length or chunked bodies.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

STREAM_LIMIT = 2**20


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    def __init__(self, base_url: str) -> None:
        url = urlsplit(base_url)
        assert url.hostname is not None
        assert url.port is not None
        self._host, self._port = url.hostname, url.port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
        """Send one request (a JSON body when `body` is not None) and read the whole answer."""
        # The server closes idle keep-alive connections (uvicorn: after 5 s): then open a new one.
        if self._writer is None or self._writer.is_closing() or self._reader is None or self._reader.at_eof():
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port, limit=STREAM_LIMIT)
        assert self._reader is not None
        payload = b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host}:{self._port}", f"Content-Length: {len(payload)}"]
        if body is not None:
            lines.append("Content-Type: application/json")
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        reply = await _read_reply(self._reader)
        if reply.headers.get("connection", "").lower() == "close":
            await self.close()
        return reply

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


async def _read_reply(reader: asyncio.StreamReader) -> Reply:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in head[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunks(reader)
    else:
        body = b""
    return Reply(status, headers, body)


async def _read_chunks(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
