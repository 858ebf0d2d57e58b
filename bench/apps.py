"""uvicorn factories for the servers the benchmarks run next to the gateway (`app.main:create_app`), each
configured by BENCH_* variables since a factory takes no arguments:

- `simulator_app`: the Kling simulator (BENCH_SIM_DELAY, BENCH_SIM_ACCOUNTS as JSON [[ak, sk, slots], ...]);
- `ceiling_app`: a bare FastAPI endpoint, what any REST route costs under these uvicorn settings;
- `floor_app`: the same route sending the create through the gateway's own Kling client, and nothing else: what any
  gateway on this stack pays before its own work (BENCH_KLING_URL, BENCH_KLING_ACCOUNT as JSON [ak, sk]);
- `noop_mcp_app`: the MCP SDK's own ceiling, a no-op tool on the gateway's transport settings;
- `floor_mcp_app`: the same server with a tool that sends the create through the gateway's Kling client;
- `lag_probed_gateway`: the gateway plus an event-loop lag monitor, read at `/_bench/lag`;
- `profiled_gateway`: the gateway plus pyinstrument, started and stopped at `/_bench/profile`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from mcp.server import MCPServer
from pydantic import BaseModel
from pyinstrument import Profiler
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.http_pool import create_kling_pool
from app.kling import KlingClient, KlingCredentials, KlingTask, build_generation_body
from app.main import create_app
from app.models import GenerateRequest
from app.simulator import SimAccount, SimulatorConfig, create_simulator_app

LAG_TICK_S = 0.005
LAG_PATH = "/_bench/lag"
PROFILE_PATH = "/_bench/profile"
PROFILE_INTERVAL_S = 0.001


def simulator_app() -> Starlette:
    accounts = tuple(SimAccount(ak, sk, slots) for ak, sk, slots in json.loads(os.environ["BENCH_SIM_ACCOUNTS"]))
    return create_simulator_app(SimulatorConfig(accounts, delay=float(os.environ["BENCH_SIM_DELAY"])))


class CeilingBody(BaseModel):
    prompt: str
    wait_seconds: int = 0


def ceiling_app() -> FastAPI:
    """One route that parses a body like /generate's and answers 202 with a small JSON object."""
    app = FastAPI()

    @app.post("/generate", status_code=202)
    async def generate(body: CeilingBody) -> dict[str, Any]:
        return {"task_id": "0", "status": "submitted", "prompt": body.prompt}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


class FloorKling:
    """The one thing the floors do: the gateway's create for a request, sent through the gateway's own Kling client
    on its pool (a cached JWT, the same timeouts and circuit breaker)."""

    def __init__(self, kling_url: str, credentials: KlingCredentials) -> None:
        self._credentials = credentials
        self.pool = create_kling_pool()
        self._kling = KlingClient(self.pool, kling_url)

    @classmethod
    def from_env(cls) -> FloorKling:
        """Configured by BENCH_KLING_URL and BENCH_KLING_ACCOUNT (JSON [ak, sk]), for the floors' factories."""
        access_key, secret_key = json.loads(os.environ["BENCH_KLING_ACCOUNT"])
        return cls(os.environ["BENCH_KLING_URL"], KlingCredentials(access_key, secret_key))

    async def create(self, request: GenerateRequest) -> KlingTask:
        body = build_generation_body(request, external_task_id=f"kgw-{uuid.uuid4().hex}")
        return await self._kling.create_image_task(self._credentials, body)


def floor_app() -> FastAPI:
    """`POST /generate` as the gateway's route takes it (the same body model), sending the same create to Kling,
    then answering 202 with Kling's task id. No key, limits, record, usage or follow-up: those are the gateway's
    own work."""
    kling = FloorKling.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await kling.pool.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/generate", status_code=202)
    async def generate(body: GenerateRequest) -> dict[str, Any]:
        task = await kling.create(body)
        return {"task_id": task.task_id, "status": task.task_status}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def floor_mcp_app() -> Starlette:
    """The no-op's server (`noop_mcp_app`) with a tool that sends the gateway's create to Kling and returns its task
    id: what a `generate_image` costs on this SDK before the gateway's own work. Its pool is closed by the process's
    exit (the SDK runs a server's lifespan per request when stateless)."""
    mcp = MCPServer("floor")
    kling = FloorKling.from_env()

    @mcp.tool()
    async def generate_image(prompt: str, wait_seconds: int = 0) -> str:
        """Create a Kling task and return its id."""
        return (await kling.create(GenerateRequest(prompt=prompt, wait_seconds=wait_seconds))).task_id

    return mcp.streamable_http_app(streamable_http_path="/mcp", stateless_http=True, json_response=False)


def noop_mcp_app() -> Starlette:
    """The gateway's transport settings (stateless, SSE responses, DNS-rebinding check on) with one tool
    that does nothing: what the SDK itself costs per call."""
    mcp = MCPServer("noop")

    @mcp.tool()
    async def noop(prompt: str, wait_seconds: int = 0) -> str:
        """Return at once."""
        return "ok"

    return mcp.streamable_http_app(streamable_http_path="/mcp", stateless_http=True, json_response=False)


class LagProbe:
    """Pure ASGI in front of the gateway. A task sleeps LAG_TICK_S in a loop and records how late it wakes:
    that lateness is how long any ready callback (a request, a Kling answer) waits for the loop.
    `GET /_bench/lag` returns the recording; `POST` returns it and starts a new one."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != LAG_PATH:
            await self._app(scope, receive, send)
            return
        recorded = self._lags
        if scope["method"] == "POST":
            self._lags = []
            if self._task is None:
                self._task = asyncio.create_task(self._monitor(), name="bench lag monitor")
        await JSONResponse({"lags_s": recorded})(scope, receive, send)

    async def _monitor(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(LAG_TICK_S)
            self._lags.append(max(0.0, time.perf_counter() - started - LAG_TICK_S))


def lag_probed_gateway() -> ASGIApp:
    return LagProbe(create_app())


class ProfileSwitch:
    """Pure ASGI in front of the gateway: `POST /_bench/profile` starts pyinstrument, `DELETE` stops it and
    saves the session to BENCH_PROFILE_OUT, so only the measured requests are in the profile (not start-up)."""

    def __init__(self, app: ASGIApp, out: str) -> None:
        self._app = app
        self._out = out
        # async_mode="disabled": sample whatever the loop's thread runs, as the process spends its time.
        self._profiler = Profiler(interval=PROFILE_INTERVAL_S, async_mode="disabled")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PROFILE_PATH:
            await self._app(scope, receive, send)
            return
        if scope["method"] == "POST":
            self._profiler.start()
        else:
            self._profiler.stop().save(self._out)
        await JSONResponse({"ok": True})(scope, receive, send)


def profiled_gateway() -> ASGIApp:
    return ProfileSwitch(create_app(), os.environ["BENCH_PROFILE_OUT"])
