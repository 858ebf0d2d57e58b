"""uvicorn factories for the servers the benchmarks run next to the gateway, each configured by BENCH_* variables
since a factory takes no arguments. Each module holds the factories of a weight: a process imports only what its
server needs, and a server's start (several at once, on two cores) is much of a quick run.

- `simulator_app`: the Kling simulator (BENCH_SIM_DELAY, BENCH_SIM_ACCOUNTS as JSON [[ak, sk, slots], ...]);
- `ceiling_app`: a bare FastAPI endpoint, what any REST route costs under these uvicorn settings;
- `floor_app`: the same route sending the create through the gateway's own Kling client, and nothing else: what any
  gateway on this stack pays before its own work (BENCH_KLING_URL, BENCH_KLING_ACCOUNT as JSON [ak, sk]);
  with BENCH_REDIS_URL, also the two Redis round trips any gateway keeping its limits and tasks in Redis makes
  around the create (the floor with Redis).

The MCP servers are in bench/mcp_apps.py, the gateway with a probe in front in bench/probes.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from starlette.applications import Starlette

from app.http_pool import create_kling_pool
from app.kling import KlingClient, KlingCredentials, KlingTask, build_generation_body
from app.models import GenerateRequest
from app.simulator import SimAccount, SimulatorConfig, create_simulator_app


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


class FloorRedis:
    """What any gateway that keeps its limits and its tasks in Redis must add around the create, on the gateway's
    own Redis client and pool: a script before it (the admission: nothing may be sent to Kling before it says yes)
    and a write after it (the task's record: the answer may not go out before another replica could find the
    task). One round trip each; nothing else of the gateway's."""

    # An admission's least: a script that counts the request against a window, one round trip like the limiter's.
    ADMISSION = "local n = redis.call('INCR', KEYS[1]); redis.call('PEXPIRE', KEYS[1], 60000); return n"

    def __init__(self, url: str) -> None:
        from app.main import create_redis  # here, not above: the other factories' processes need none of app.main

        self.redis = create_redis(url, retries=0)
        self._admit = self.redis.register_script(self.ADMISSION)

    async def admit(self) -> None:
        await self._admit(keys=["bench:floor:admitted"])

    async def record(self, task: KlingTask, prompt: str) -> None:
        record = json.dumps({"task_id": task.task_id, "status": task.task_status, "prompt": prompt})
        await self.redis.set(f"bench:floor:task:{task.task_id}", record, ex=3600)


def floor_app() -> FastAPI:
    """`POST /generate` as the gateway's route takes it (the same body model), sending the same create to Kling,
    then answering 202 with Kling's task id. No key, limits, record, usage or follow-up: those are the gateway's
    own work. With BENCH_REDIS_URL, the floor with Redis: the two round trips of `FloorRedis` around the create."""
    kling = FloorKling.from_env()
    redis_url = os.environ.get("BENCH_REDIS_URL")
    store = FloorRedis(redis_url) if redis_url else None

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await kling.pool.aclose()
        if store is not None:
            await store.redis.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/generate", status_code=202)
    async def generate(body: GenerateRequest) -> dict[str, Any]:
        if store is not None:
            await store.admit()
        task = await kling.create(body)
        if store is not None:
            await store.record(task, body.prompt)
        return {"task_id": task.task_id, "status": task.task_status}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
