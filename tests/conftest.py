"""Fixtures and helpers shared by the test modules: a private redis-server, the Kling simulator, the gateway
(each really served on loopback), an MCP client, the CLI, and a tiny OAuth authorization server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.config import Settings
from app.logs import JsonFormatter
from app.main import Gateway, build_gateway
from app.oauth import OAuthConfig, OAuthVerifier
from app.sealing import new_master_key
from app.simulator import SimAccount, SimulatorConfig, create_simulator_app
from app.tracing import Tracing
from tests.servers import redis_server, serve

ADMIN_TOKEN = "admin-" + secrets.token_urlsafe(24)
KEY_PEPPER = "pepper-" + secrets.token_urlsafe(24)
MASTER_KEY = new_master_key()
PRIMARY = SimAccount(access_key="ak-primary", secret_key="sk-primary-" + secrets.token_hex(24), concurrency=20)
SECONDARY = SimAccount(access_key="ak-secondary", secret_key="sk-secondary-" + secrets.token_hex(24), concurrency=20)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


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

    async def new_api_key(self, name: str, account: SimAccount = PRIMARY, *, concurrency: int | None = None) -> str:
        """Create a tenant through the admin API and issue it a key; `concurrency`: the images its Kling account
        runs at once, when not the admin API's default."""
        kling: dict[str, object] = {"access_key": account.access_key, "secret_key": account.secret_key}
        if concurrency is not None:
            kling["concurrency"] = concurrency
        body = {"name": name, "kling": kling}
        created = await self.http.post(f"{self.url}/admin/tenants", json=body, headers=ADMIN)
        assert created.status_code == 201, created.text
        issued = await self.http.post(
            f"{self.url}/admin/tenants/{created.json()['id']}/keys", json={"label": "tests"}, headers=ADMIN
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


def redis_gateway_settings(simulator: Simulator, redis_url: str, **overrides: object) -> Settings:
    """A gateway on Redis, sharing the pepper and master key of every other replica the tests start."""
    values: dict[str, object] = {"redis_url": redis_url, "key_pepper": KEY_PEPPER, "master_key": MASTER_KEY}
    return gateway_settings(simulator, **(values | overrides))


@asynccontextmanager
async def running_gateway(settings: Settings, tracing: Tracing | None = None) -> AsyncIterator[RunningGateway]:
    """A gateway built from `settings` (and `tracing`, else what the environment configures), served on loopback."""
    built = build_gateway(settings, tracing)
    async with serve(built.app) as url, httpx2.AsyncClient(timeout=30) as http:
        yield RunningGateway(url=url, gateway=built, http=http)


@pytest.fixture
async def gateway(simulator: Simulator) -> AsyncIterator[RunningGateway]:
    async with running_gateway(gateway_settings(simulator)) as running:
        yield running


@pytest.fixture
async def redis_gateway(simulator: Simulator, redis: Redis, redis_url: str) -> AsyncIterator[RunningGateway]:
    async with running_gateway(redis_gateway_settings(simulator, redis_url)) as running:
        yield running


# --- the official MCP client over streamable HTTP ---


@asynccontextmanager
async def mcp_client(target: str | RunningGateway, api_key: str, mode: str = "auto") -> AsyncIterator[Client]:
    """An MCP client of the gateway at `target` (its base URL, or the running gateway) using `api_key`.
    `mode` picks the protocol era: "legacy" (2025-11-25, initialize handshake) or "auto" (sessionless)."""
    url = target if isinstance(target, str) else target.url
    async with (
        httpx2.AsyncClient(headers=bearer(api_key), timeout=httpx2.Timeout(30, read=120)) as http,
        Client(streamable_http_client(f"{url}/mcp", http_client=http), mode=mode) as client,
    ):
        yield client


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def structured(result: CallToolResult) -> dict[str, Any]:
    assert isinstance(result.structured_content, dict)
    return result.structured_content


# --- the `kling-gateway` command line, run as an operator would ---

CLI = [sys.executable, "-m", "app.cli"]


def cli_env(**settings: str) -> dict[str, str]:
    """This process's environment without any KGW_ setting, plus `settings`."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("KGW_")}
    return env | settings


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run `kling-gateway *args`; returns its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        with anyio.fail_after(60):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:  # timed out: do not leave it running
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


# --- a tiny OAuth authorization server: discovery and JWKS, and tokens it "issues" ---

AUDIENCE = "https://mcp.example.com/mcp"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
DROP = object()  # a claim value meaning "leave this claim out"


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str, alg: str | None = "RS256") -> dict[str, Any]:
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=kid, use="sig")
    if alg is not None:
        jwk["alg"] = alg
    return jwk


@dataclass
class IssuerState:
    jwks: dict[str, Any] = field(default_factory=lambda: {"keys": [rsa_jwk(RSA_KEY, "k1")]})
    jwks_fetches: int = 0
    discovery_fetches: int = 0
    jwks_down: bool = False
    openid_configuration: bool = True


def issuer_app(state: IssuerState) -> Starlette:
    def metadata(request: Request) -> dict[str, str]:
        base = str(request.base_url).rstrip("/")
        return {"issuer": base, "jwks_uri": f"{base}/jwks.json"}

    async def openid_configuration(request: Request) -> Response:
        state.discovery_fetches += 1
        if not state.openid_configuration:
            return JSONResponse({"error": "not found"}, status_code=404)
        return JSONResponse(metadata(request))

    async def oauth_authorization_server(request: Request) -> Response:
        state.discovery_fetches += 1
        return JSONResponse(metadata(request))

    async def jwks(request: Request) -> Response:
        state.jwks_fetches += 1
        if state.jwks_down:
            return JSONResponse({"error": "unavailable"}, status_code=503)
        return JSONResponse(state.jwks)

    return Starlette(
        routes=[
            Route("/.well-known/openid-configuration", openid_configuration),
            Route("/.well-known/oauth-authorization-server", oauth_authorization_server),
            Route("/jwks.json", jwks),
        ]
    )


@dataclass
class Issuer:
    url: str
    state: IssuerState
    http: httpx2.AsyncClient

    def verifier(self, *, min_refetch_interval_s: float = 30.0, **config: Any) -> OAuthVerifier:
        settings: dict[str, Any] = {"issuer": self.url, "audience": AUDIENCE, **config}
        return OAuthVerifier(OAuthConfig(**settings), self.http, min_refetch_interval_s=min_refetch_interval_s)

    def claims(self, **overrides: object) -> dict[str, object]:
        now = int(time.time())
        values: dict[str, object] = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": "user-1",
            "tenant": "acme",
            "scope": "images:generate images:read",
            "iat": now,
            "exp": now + 300,
            **overrides,
        }
        return {name: value for name, value in values.items() if value is not DROP}

    def mint(self, key: Any = RSA_KEY, kid: str | None = "k1", algorithm: str = "RS256", **overrides: object) -> str:
        headers = {"kid": kid} if kid is not None else None
        return jwt.encode(self.claims(**overrides), key, algorithm=algorithm, headers=headers)


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    state = IssuerState()
    async with serve(issuer_app(state)) as url, httpx2.AsyncClient(timeout=5) as http:
        yield Issuer(url=url, state=state, http=http)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, object], payload: dict[str, object], sign: bytes | None = None) -> str:
    """A token built without pyjwt; `sign` is the HMAC secret (HS256), or None for an empty signature."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = b"" if sign is None else hmac.new(sign, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"
