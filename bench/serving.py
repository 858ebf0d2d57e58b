"""Every server a benchmark measures runs in its own process, so the client never shares an event loop with it:

    python -m bench.serving MODULE:FACTORY PORT [--gateway]

With `--gateway` the process runs `kling-gateway serve` itself (app/cli.py: its uvicorn settings and logging
configuration, whatever they are now), serving FACTORY in place of `app.main:create_app` (FACTORY wraps the
gateway with a probe, see bench/apps.py). Other servers (the simulator, the ceilings) run under the same uvicorn
settings as `serve` passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import uvicorn
from uvicorn.importer import import_from_string

import app.main
from app import cli
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def raise_fd_limit() -> int:
    """Up to the hard limit: ten thousand waiting callers are ten thousand sockets on each side."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass(frozen=True)
class Server:
    url: str
    pid: int
    port: int

    def rss_bytes(self) -> int:
        """Resident memory of the server process, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {self.pid}")


@contextlib.asynccontextmanager
async def served(
    factory: str, env: dict[str, str], *, ready_path: str = "/healthz", port: int | None = None, gateway: bool = False
) -> AsyncIterator[Server]:
    """Run `factory` (MODULE:FACTORY) in a new process with only `env` (plus PATH) as its environment."""
    port = port or free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.serving", factory, str(port), *(["--gateway"] if gateway else []), cwd=ROOT,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", process.pid, port)
    try:
        await _wait_until_ready(server.url + ready_path, process)
        yield server
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            async with asyncio.timeout(30):
                await process.wait()


async def _wait_until_ready(url: str, process: asyncio.subprocess.Process) -> None:
    async with httpx2.AsyncClient(timeout=2) as http, asyncio.timeout(60):
        while process.returncode is None:
            with contextlib.suppress(httpx2.TransportError):
                if (await http.get(url)).status_code < 500:
                    return
            await asyncio.sleep(0.1)  # nothing to await but the port opening
    raise RuntimeError(f"{url}: the server process exited with {process.returncode}")


def main(factory: str, port: int, as_gateway: bool) -> None:
    raise_fd_limit()
    if as_gateway:
        # uvicorn imports "app.main:create_app" from the module already loaded here, so it builds this instead.
        app.main.create_app = import_from_string(factory)
        raise SystemExit(cli.main(["serve", "--host", "127.0.0.1", "--port", str(port)]))
    uvicorn.run(factory, factory=True, host="127.0.0.1", port=port, workers=1, proxy_headers=True, ws="none",
                timeout_graceful_shutdown=5)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), "--gateway" in sys.argv[3:])
