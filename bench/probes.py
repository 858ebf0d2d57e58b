"""The gateway (`app.main:create_app`) with a probe in front, for `python -m bench.serving FACTORY PORT --gateway`:

- `lag_probed_gateway`: plus an event-loop lag monitor and a record of garbage collections, read at
  `/_bench/lag` (bench/waiting.py);
- `profiled_gateway`: plus pyinstrument, started and stopped at `/_bench/profile` (bench/hotpath.py).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time

from pyinstrument import Profiler
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.main import create_app

LAG_TICK_S = 0.005
LAG_PATH = "/_bench/lag"
PROFILE_PATH = "/_bench/profile"
PROFILE_INTERVAL_S = 0.001


class LagProbe:
    """Pure ASGI in front of the gateway. A task sleeps LAG_TICK_S in a loop and records how late it wakes:
    that lateness is how long any ready callback (a request, a Kling answer) waits for the loop. Each of the
    process's garbage collections is recorded too, with how long it held the worker (Python's collector stops
    everything while it runs). `GET /_bench/lag` returns the recording; `POST` returns it and starts a new one."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._lags: list[float] = []
        self._collections: list[float] = []
        self._collecting_since = 0.0
        self._task: asyncio.Task[None] | None = None
        gc.callbacks.append(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._collecting_since = time.perf_counter()
        else:
            self._collections.append(time.perf_counter() - self._collecting_since)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != LAG_PATH:
            await self._app(scope, receive, send)
            return
        recorded = {"lags_s": self._lags, "collections_s": self._collections}
        if scope["method"] == "POST":
            self._lags, self._collections = [], []
            if self._task is None:
                self._task = asyncio.create_task(self._monitor(), name="bench lag monitor")
        await JSONResponse(recorded)(scope, receive, send)

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
