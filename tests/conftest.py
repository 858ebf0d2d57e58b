"""Fixtures: a private redis-server, the Kling simulator and the gateway, each really served on loopback."""

from __future__ import annotations

import io
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx2
import pytest
from redis.asyncio import Redis

from app.config import Settings
from app.logs import JsonFormatter
from app.main import Gateway, build_gateway
from app.sealing import new_master_key
from app.simulator import SimAccount, SimulatorConfig, create_simulator_app
from tests.servers import redis_server, serve

ADMIN_TOKEN = "admin-" + secrets.token_urlsafe(24)
KEY_PEPPER = "pepper-" + secrets.token_urlsafe(24)
MASTER_KEY = new_master_key()
PRIMARY = SimAccount(access_key="ak-primary", secret_key="sk-primary-" + secrets.token_hex(24), concurrency=20)
SECONDARY = SimAccount(access_key="ak-secondary", secret_key="sk-secondary-" + secrets.token_hex(24), concurrency=20)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Everything logged while the test runs, formatted as the gateway writes it to stdout."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@dataclass
class Simulator:
    url: str
    http: httpx2.AsyncClient

    async def control(self, path: str, body: dict[str, object]) -> None:
        response = await self.http.post(f"{self.url}/_sim/{path}", json=body)
        response.raise_for_status()

    async def stats(self) -> dict[str, object]:
        response = await self.http.get(f"{self.url}/_sim/stats")
        response.raise_for_status()
        stats: dict[str, object] = response.json()
        return stats


def replica_env(redis_url: str, kling_url: str, **settings: str) -> dict[str, str]:
    """The settings of a gateway process sharing the test Redis and simulator with the in-process gateway."""
    env = {"KGW_REDIS_URL": redis_url, "KGW_KEY_PEPPER": KEY_PEPPER, "KGW_MASTER_KEY": MASTER_KEY,
           "KGW_KLING_BASE_URL": kling_url, "KGW_POLL_INTERVAL_SECONDS": "0.05"}  # fmt: skip
    return env | {f"KGW_{name.upper()}": value for name, value in settings.items()}


@pytest.fixture
async def simulator(request: pytest.FixtureRequest) -> AsyncIterator[Simulator]:
    """The Kling simulator; `@pytest.mark.sim_delay(seconds)` sets how long its tasks take (default 0.3 s)."""
    marker = request.node.get_closest_marker("sim_delay")
    config = SimulatorConfig(accounts=(PRIMARY, SECONDARY), delay=marker.args[0] if marker else 0.3)
    async with serve(create_simulator_app(config)) as url, httpx2.AsyncClient(timeout=10) as http:
        yield Simulator(url=url, http=http)


@dataclass
class RunningGateway:
    url: str
    gateway: Gateway
    http: httpx2.AsyncClient

    async def new_api_key(self, name: str, account: SimAccount = PRIMARY) -> str:
        """Create a tenant through the admin API and issue it a key."""
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        body = {"name": name, "kling": {"access_key": account.access_key, "secret_key": account.secret_key}}
        created = await self.http.post(f"{self.url}/admin/tenants", json=body, headers=admin)
        assert created.status_code == 201, created.text
        issued = await self.http.post(
            f"{self.url}/admin/tenants/{created.json()['id']}/keys", json={"label": "tests"}, headers=admin
        )
        assert issued.status_code == 201, issued.text
        api_key: str = issued.json()["api_key"]
        return api_key


def gateway_settings(simulator: Simulator, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "kling_base_url": simulator.url,
        "admin_token": ADMIN_TOKEN,
        "poll_interval_seconds": 0.05,
        "redis_url": None,
        **overrides,
    }
    return Settings.model_validate(values)


@pytest.fixture
async def gateway(simulator: Simulator) -> AsyncIterator[RunningGateway]:
    built = build_gateway(gateway_settings(simulator))
    async with serve(built.app) as url, httpx2.AsyncClient(timeout=30) as http:
        yield RunningGateway(url=url, gateway=built, http=http)


@pytest.fixture
async def redis_gateway(simulator: Simulator, redis: Redis, redis_url: str) -> AsyncIterator[RunningGateway]:
    settings = gateway_settings(simulator, redis_url=redis_url, key_pepper=KEY_PEPPER, master_key=MASTER_KEY)
    built = build_gateway(settings)
    async with serve(built.app) as url, httpx2.AsyncClient(timeout=30) as http:
        yield RunningGateway(url=url, gateway=built, http=http)
