"""Real servers on loopback for the tests: uvicorn on a pre-bound socket, redis-server on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template

import httpx2
import uvicorn
from starlette.types import ASGIApp


@contextlib.asynccontextmanager
async def serve(app: ASGIApp, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve `app` with uvicorn (lifespan included) on a free port; yield its base URL."""
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only then; without it each keep-alive request waits
    # ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind((host, 0))
    # log_config=None leaves logging to pytest, so tests can read every log line (access log included).
    config = uvicorn.Config(app, lifespan="on", log_config=None, ws="none", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(10):
            await task
        sock.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_redis(port: int, workdir: str, *options: str) -> subprocess.Popen[bytes]:
    """redis-server with `options` (a configuration file first, if any) on 127.0.0.1:`port`, its files in
    `workdir`; returns once it listens."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
    process = subprocess.Popen(
        [binary, *options, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for_port(port, process)
    except BaseException:
        process.terminate()
        process.wait(timeout=10)
        raise
    return process


@contextlib.asynccontextmanager
async def loopback_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], tls: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    """A bare TCP (or TLS) server on 127.0.0.1 running `handle` for each connection; yields its port."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server on a free loopback port, keeping nothing on disk; yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        process = start_redis(port, workdir, "--save", "", "--appendonly", "no", "--protected-mode", "yes")
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"redis-server did not listen on {port} within {timeout_s} s")


@dataclass
class Replica:
    """A gateway process started with `kling-gateway serve`, as an operator would run one."""

    url: str
    process: asyncio.subprocess.Process


@contextlib.asynccontextmanager
async def gateway_process(env: dict[str, str], workers: int = 1) -> AsyncIterator[Replica]:
    """Start `kling-gateway serve` with only `env` (plus PATH) as its settings; stop it on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = ["-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    async with python_process(argv, env, f"{url}/readyz") as process:
        yield Replica(url, process)


@contextlib.asynccontextmanager
async def python_process(
    argv: Sequence[str], env: dict[str, str], ready_url: str, *, cwd: Path | None = None, stop_within_s: float = 30
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python ARGV...` with only `env` (plus PATH) as its environment, once `ready_url` answers below 500;
    interrupted (SIGINT, as Ctrl-C) and waited for on exit."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, *argv, cwd=cwd, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await _wait_until_ready(ready_url, process)
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            async with asyncio.timeout(stop_within_s):
                await process.wait()


async def _wait_until_ready(url: str, process: asyncio.subprocess.Process) -> None:
    async with httpx2.AsyncClient(timeout=2) as http, asyncio.timeout(60):
        while process.returncode is None:
            with contextlib.suppress(httpx2.TransportError):
                if (await http.get(url)).status_code < 500:
                    return
            await asyncio.sleep(0.1)  # nothing to await but the port opening
    raise RuntimeError(f"{url}: the server process exited with {process.returncode}")


class RedisProcess:
    """A redis-server that can be stopped and started again on the same port with its data (append-only
    file in a private directory), for tests of what happens while Redis is away."""

    def __init__(self, workdir: str) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = workdir
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = start_redis(self.port, self._workdir, "--save", "", "--appendonly", "yes",
                                    "--appendfsync", "always")  # fmt: skip

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None


NGINX_TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "kling-gateway.conf.template"


@contextlib.contextmanager
def nginx_proxy(upstreams: Sequence[str]) -> Iterator[str]:
    """A real nginx on a free loopback port, configured by deploy/nginx's template to balance over
    `upstreams` (`host:port`); yields its URL. Its files live in a private directory."""
    binary = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if binary is None:
        raise RuntimeError("nginx is not installed (Debian: apt-get install nginx)")
    port = free_port()
    servers = " ".join(f"server {upstream};" for upstream in upstreams)
    site = Template(NGINX_TEMPLATE.read_text()).safe_substitute(
        KGW_UPSTREAM_SERVERS=servers, KGW_PROXY_LISTEN=f"127.0.0.1:{port}"
    )
    with tempfile.TemporaryDirectory() as workdir:
        # As root, nginx's workers would run as `nobody`, who cannot enter this private directory.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        temp_paths = "\n".join(f"{kind}_temp_path {workdir}/{kind};" for kind in
                               ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))  # fmt: skip
        Path(workdir, "site.conf").write_text(site)
        Path(workdir, "nginx.conf").write_text(
            f"{user}\ndaemon off;\nworker_processes 1;\npid {workdir}/nginx.pid;\nerror_log stderr warn;\n"
            f"events {{ worker_connections 512; }}\n"
            f"http {{\naccess_log off;\n{temp_paths}\ninclude {workdir}/site.conf;\n}}\n"
        )
        process = subprocess.Popen(
            [binary, "-p", workdir, "-c", f"{workdir}/nginx.conf", "-e", "stderr"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait_for_port(port, process)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.send_signal(signal.SIGQUIT)  # graceful: finish open requests, then exit
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
