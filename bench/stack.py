"""The parts a benchmark runs against: the Kling simulator and gateways in their own processes, and tenants
created through the admin API with limits high enough that only the machine limits them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx2
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from redis.asyncio import Redis

from app.config import Settings
from app.sealing import new_master_key
from app.simulator import SimAccount
from app.status_queries import BATCH_WINDOW_S
from bench.measure import Run
from bench.serving import ROOT, Server, served
from tests.servers import free_port

ADMIN_TOKEN = "bench-admin-" + secrets.token_urlsafe(24)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DEFAULT_FIRST_QUERY_S = Settings.model_fields["poll_interval_seconds"].default


@dataclass(frozen=True)
class Following:
    """How soon the throughput benchmarks' Kling ends a task (`task_s`) and their gateways first query it
    (`first_query_s`, KGW_POLL_INTERVAL_SECONDS; None: the default). The query comes after the create's answer, so
    it finds the task ended either way; what differs is how long a run's following of its tasks lasts after it, and
    how many reads of one account fall due together and so share a list call."""

    task_s: float
    first_query_s: float | None

    @property
    def read_after_s(self) -> float:
        """From a task's create to its status read, which waits for others of its account (StatusQueries)."""
        return (self.first_query_s or DEFAULT_FIRST_QUERY_S) + BATCH_WINDOW_S


# A full run's gateways are on the default settings. A quick run's query four times sooner, so its runs end sooner;
# but more of their reads share list calls: paced, a task cost 4.9 ms of CPU against 5.4 on the default, in an A/B
# on this host.
FULL, QUICK = Following(task_s=0.2, first_query_s=None), Following(task_s=0.1, first_query_s=0.25)
# The admin API's ceilings: nothing but the machine should refuse a benchmark's requests.
UNLIMITED = {"requests_per_minute": 1_000_000, "concurrent_tasks": 100_000, "images_per_day": 100_000_000}
ACCOUNT_SLOTS = 1000  # the largest `concurrency` the admin API accepts for one Kling account
# One TLS context for every HTTP client the benchmarks open: each would otherwise build its own, loading the CA
# bundle (about 0.1 s here), and the MCP benchmark opens dozens. The servers are plain HTTP on loopback anyway.
TLS = ssl.create_default_context()


def accounts_for(slots: int) -> tuple[SimAccount, ...]:
    """Enough simulated Kling accounts of ACCOUNT_SLOTS image slots each to hold `slots` images at once."""
    return tuple(
        SimAccount(f"bench-ak-{index}-{uuid.uuid4().hex[:6]}", "bench-sk-" + secrets.token_hex(24), ACCOUNT_SLOTS)
        for index in range(max(1, math.ceil(slots / ACCOUNT_SLOTS)))
    )


class SimulatorProcess(contextlib.AbstractAsyncContextManager[Server]):
    """The simulator in a process of its own, holding `accounts`, finishing each task after `delay_s`. Its URL
    is known before it starts, so the gateways that call it can start alongside it (`enter_together`)."""

    def __init__(self, delay_s: float, accounts: tuple[SimAccount, ...]) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {"BENCH_SIM_DELAY": str(delay_s),
               "BENCH_SIM_ACCOUNTS": json.dumps([[a.access_key, a.secret_key, a.concurrency] for a in accounts])}  # fmt: skip
        # Quiet, as `kling-gateway simulator` runs it: Kling's access log is no work of this machine's.
        self._served = served("bench.apps:simulator_app", env, ready_path="/_sim/stats", port=port, quiet=True)

    async def __aenter__(self) -> Server:
        return await self._served.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._served.__aexit__(*exc_info)


@contextlib.asynccontextmanager
async def gateway(
    kling_url: str,
    *,
    redis_url: str | None = None,
    factory: str = "app.main:create_app",
    callbacks: bool = False,
    first_query_s: float | None = None,
    extra_env: dict[str, str] | None = None,
    root: Path = ROOT,
) -> AsyncIterator[Server]:
    """A gateway process on the default settings but `first_query_s` (None: the default), from the code under
    `root`; `callbacks` sets KGW_PUBLIC_URL to its own address, so the simulator calls it back as Kling would."""
    port = free_port()
    env = {"KGW_KLING_BASE_URL": kling_url, "KGW_ADMIN_TOKEN": ADMIN_TOKEN, **(extra_env or {})}
    if first_query_s is not None:
        env["KGW_POLL_INTERVAL_SECONDS"] = str(first_query_s)
    if redis_url is not None:
        env |= {"KGW_REDIS_URL": redis_url, "KGW_KEY_PEPPER": secrets.token_urlsafe(24),
                "KGW_MASTER_KEY": new_master_key()}  # fmt: skip
    if callbacks:
        env["KGW_PUBLIC_URL"] = f"http://127.0.0.1:{port}"
    async with served(factory, env, port=port, gateway=True, root=root) as server:
        yield server


@contextlib.asynccontextmanager
async def floor_server(
    factory: str, kling_url: str, account: SimAccount, redis_url: str | None = None
) -> AsyncIterator[Server]:
    """A floor (bench/apps.py `floor_app`, with Redis at `redis_url` if given, or bench/mcp_apps.py
    `floor_mcp_app`) sending its creates to `kling_url` as `account`."""
    env = {"BENCH_KLING_URL": kling_url, "BENCH_KLING_ACCOUNT": json.dumps([account.access_key, account.secret_key])}
    if redis_url is not None:
        env["BENCH_REDIS_URL"] = redis_url
    async with served(factory, env) as server:
        yield server


async def settled(gateway_url: str, following: Following, within_s: float = 30.0) -> None:
    """Until the gateway (started with `following.first_query_s`), just sent a run of tasks, follows none any
    more (`kgw_tasks_in_flight` 0): the polls and releases that come after the answers are part of what a run costs
    it. The gauge is read only from when the last task's status read is due: each reading is a /metrics scrape,
    about 7 ms of the gateway's CPU here, that would be booked to the run."""
    async with httpx2.AsyncClient(timeout=10, verify=TLS) as http, asyncio.timeout(within_s):
        await asyncio.sleep(following.read_after_s)
        while True:
            if sum(sample.value for sample in await _samples(http, gateway_url, "kgw_tasks_in_flight")) == 0:
                return
            await asyncio.sleep(0.1)  # a gauge: nothing to await but its next reading


async def kling_calls(gateway_url: str) -> dict[str, float]:
    """The HTTP calls the gateway has sent to Kling so far, by endpoint (`create`, `query`, `list`), from its
    `kgw_kling_requests_total`."""
    async with httpx2.AsyncClient(timeout=10, verify=TLS) as http:
        samples = await _samples(http, gateway_url, "kgw_kling_requests_total")
    calls: dict[str, float] = {}
    for sample in samples:
        calls[sample.labels["endpoint"]] = calls.get(sample.labels["endpoint"], 0.0) + sample.value
    return calls


async def _samples(http: httpx2.AsyncClient, gateway_url: str, name: str) -> list[Sample]:
    """The samples named `name` (every label set) in the gateway's /metrics."""
    families = text_string_to_metric_families((await http.get(f"{gateway_url}/metrics")).text)
    return [sample for family in families for sample in family.samples if sample.name == name]


async def with_server_cpu(
    server: Server, requests: int, load: Callable[[], Awaitable[Run]], *, following: Following | None
) -> Run:
    """`load`'s run, with the CPU `server` used per request of the `requests` it was sent; for a gateway (which
    follows its tasks as `following` says) up to the end of its following of their tasks, whose status queries and
    releases are part of what each costs it. The next run then starts on a server with none of this one's work left
    over."""
    before = server.cpu_seconds()
    run = await load()
    if following is not None:
        await settled(server.url, following)
    return replace(run, server_cpu_ms=(server.cpu_seconds() - before) * 1000 / requests)


# redis-server runs a gateway's scripts in tens of µs; one that took it over this long waited for a core meanwhile.
SLOW_COMMAND_US = 1000


class SlowCommands:
    """Watches a redis-server's SLOWLOG over runs: each run comes back with how many commands took the server over
    SLOW_COMMAND_US to run, per 1,000 of the `requests` it sent. Runs that alternate on one server are each counted
    alone."""

    def __init__(self, url: str) -> None:
        self._redis = Redis.from_url(url)

    def watching(self, requests: int, load: Callable[[], Awaitable[Run]]) -> Callable[[], Awaitable[Run]]:
        async def watched() -> Run:
            await self._redis.config_set("slowlog-log-slower-than", SLOW_COMMAND_US)
            await self._redis.config_set("slowlog-max-len", 100_000)
            await self._redis.slowlog_reset()
            run = await load()
            return replace(run, slow_redis_commands=1000 * await self._redis.slowlog_len() / requests)

        return watched

    async def aclose(self) -> None:
        await self._redis.aclose()


async def api_keys(gateway_url: str, accounts: tuple[SimAccount, ...], limits: dict[str, int] = UNLIMITED) -> list[str]:
    """One tenant per Kling account, each with `limits` (default UNLIMITED); returns a key of each."""
    keys = []
    async with httpx2.AsyncClient(timeout=30, headers=ADMIN, verify=TLS) as http:
        for account in accounts:
            kling = {"access_key": account.access_key, "secret_key": account.secret_key, "concurrency": ACCOUNT_SLOTS}
            body = {"name": f"bench-{uuid.uuid4().hex[:8]}", "kling": kling, "limits": limits}
            created = await http.post(f"{gateway_url}/admin/tenants", json=body)
            created.raise_for_status()
            issued = await http.post(f"{gateway_url}/admin/tenants/{created.json()['id']}/keys", json={})
            issued.raise_for_status()
            keys.append(issued.json()["api_key"])
    return keys
