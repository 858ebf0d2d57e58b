"""Every server a benchmark measures runs in its own process, so the client never shares an event loop with it:

    python -m bench.serving MODULE:FACTORY PORT [--gateway]

With `--gateway` the process runs `kling-gateway serve` itself (app/cli.py: its uvicorn settings and logging
configuration, whatever they are now), serving FACTORY in place of `app.main:create_app` (FACTORY wraps the
gateway with a probe, see bench/probes.py). Other servers (the simulator, the ceilings) run under the same uvicorn
settings as `serve` passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import uvicorn

from tests.servers import free_port, python_process

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


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

    def cpu_seconds(self) -> float:
        """CPU time the server process has used (user and system), from /proc."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@contextlib.asynccontextmanager
async def served(
    factory: str,
    env: dict[str, str],
    *,
    ready_path: str = "/healthz",
    port: int | None = None,
    gateway: bool = False,
    quiet: bool = False,
    root: Path = ROOT,
) -> AsyncIterator[Server]:
    """Run `factory` (MODULE:FACTORY) in a new process with only `env` (plus PATH) as its environment, from the
    code under `root` (another checkout's, to compare two commits); `quiet`: no access log, as the simulator
    runs (`kling-gateway simulator`)."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    argv = ["-m", "bench.serving", factory, str(port), *(["--gateway"] if gateway else []),
            *(["--quiet"] if quiet else [])]  # fmt: skip
    async with python_process(argv, env, url + ready_path, cwd=root) as process:
        yield Server(url, process.pid, port)


async def enter_together(
    stack: contextlib.AsyncExitStack, *servers: contextlib.AbstractAsyncContextManager[T]
) -> list[T]:
    """Start `servers` at once, and have `stack` stop them at once: a server's process takes a second or two to
    import and start on this machine, and a few tenths of a second to stop, so one after the other would be much
    of a quick run."""
    started: list[contextlib.AbstractAsyncContextManager[T]] = []
    stack.push_async_callback(_stop_together, started)  # first, so a failed start still stops those that started

    async def start(server: contextlib.AbstractAsyncContextManager[T]) -> T:
        entered = await server.__aenter__()
        started.append(server)
        return entered

    async with asyncio.TaskGroup() as group:  # one failing cancels the others (each stops its own process)
        starting = [group.create_task(start(server)) for server in servers]
    return [task.result() for task in starting]


async def _stop_together(servers: list[contextlib.AbstractAsyncContextManager[T]]) -> None:
    """Every server is stopped and waited for, even when another one's stop fails: a failure is raised after."""
    stopped = await asyncio.gather(*(server.__aexit__(None, None, None) for server in servers), return_exceptions=True)
    failures = [outcome for outcome in stopped if isinstance(outcome, BaseException)]
    if failures:
        raise failures[0]


def main(factory: str, port: int, as_gateway: bool, quiet: bool) -> None:
    raise_fd_limit()
    if as_gateway:
        # Imported here: the other servers start in a fraction of the time without the gateway's imports.
        from uvicorn.importer import import_from_string

        import app.main
        from app import cli

        # uvicorn imports "app.main:create_app" from the module already loaded here, so it builds this instead.
        app.main.create_app = import_from_string(factory)
        raise SystemExit(cli.main(["serve", "--host", "127.0.0.1", "--port", str(port)]))
    # Idle connections are kept longer than the gateway's Kling pool keeps them (5 s), as a load balancer in front
    # of an API does (60 s and more). With uvicorn's 5 s the simulator hangs up on connections a floor still holds
    # between runs, and a request that races the hang-up can fail: the floors, unlike the gateway, do not retry.
    uvicorn.run(factory, factory=True, host="127.0.0.1", port=port, workers=1, proxy_headers=True, ws="none",
                timeout_graceful_shutdown=5, timeout_keep_alive=65, log_level="warning" if quiet else "info",
                access_log=not quiet)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), "--gateway" in sys.argv[3:], "--quiet" in sys.argv[3:])
