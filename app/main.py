"""The composition root: `create_app(settings)` builds every part and wires it; the lifespan owns the
MCP session manager, the pooled Kling HTTP client and the Redis pool, and closes them in reverse order."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from mcp.server.transport_security import RequestBodyLimitMiddleware, TransportSecuritySettings
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from app import __version__
from app.admin import build_admin_router
from app.api import build_api_router, install_error_handlers
from app.auth import Authenticator, McpAuthMiddleware
from app.config import Settings
from app.images import ImageService
from app.kling import KlingClient, create_http_client
from app.mcp_server import build_mcp_server
from app.tasks import MemoryTaskStore, RedisTaskStore, TaskStore
from app.tenants import MemoryTenantStore, RedisTenantStore, TenantDirectory, TenantStore

REDIS_TIMEOUT_S = 1.0


class ConfigurationError(Exception):
    """The settings cannot run a safe gateway; the message says what to set."""


@dataclass(frozen=True)
class Gateway:
    """The wired parts; the CLI's demo and admin verbs use `directory` directly."""

    settings: Settings
    directory: TenantDirectory
    service: ImageService
    app: FastAPI


def create_redis(url: str) -> Redis:
    # Short timeouts and a single retry: a hung Redis must fail a request quickly, not hang it.
    return Redis.from_url(
        url,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


def open_stores(settings: Settings, redis: Redis | None) -> tuple[TenantStore, TaskStore, bytes]:
    """The store backends and the API-key pepper for these settings."""
    if redis is None:
        # The memory store lives and dies with this process, and so may its pepper.
        pepper = settings.key_pepper.get_secret_value().encode() if settings.key_pepper else secrets.token_bytes(32)
        return MemoryTenantStore(), MemoryTaskStore(), pepper
    if settings.key_pepper is None:
        raise ConfigurationError(
            "KGW_KEY_PEPPER is required with KGW_REDIS_URL: API keys stored in Redis are hashed under it. "
            'Generate one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'
        )
    return RedisTenantStore(redis), RedisTaskStore(redis), settings.key_pepper.get_secret_value().encode()


def build_gateway(settings: Settings) -> Gateway:
    redis = create_redis(settings.redis_url) if settings.redis_url else None
    tenant_store, task_store, pepper = open_stores(settings, redis)
    directory = TenantDirectory(tenant_store, pepper)
    http = create_http_client(settings.kling_max_connections)
    kling = KlingClient(http, settings.kling_base_url, deadline_s=settings.kling_timeout_seconds)
    service = ImageService(
        kling, task_store, max_wait_s=settings.max_wait_seconds, first_poll_interval_s=settings.poll_interval_seconds
    )
    authenticator = Authenticator(directory)
    mcp = build_mcp_server(service, default_wait_s=settings.default_wait_seconds)
    mcp_app = mcp.streamable_http_app(
        streamable_http_path="/mcp",
        stateless_http=True,  # any replica can serve any request
        json_response=False,  # SSE, so progress notifications reach the client while a tool waits
        max_request_body_size=settings.max_body_bytes,
        transport_security=TransportSecuritySettings(
            enable_dns_rebinding_protection=not settings.host_check_disabled(),
            allowed_hosts=settings.mcp_allowed_hosts(),
            allowed_origins=settings.mcp_allowed_origins(),
        ),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if redis is not None:
                stack.push_async_callback(redis.aclose)
            stack.push_async_callback(http.aclose)
            await stack.enter_async_context(mcp.session_manager.run())
            yield

    app = FastAPI(
        title="Kling MCP Gateway",
        version=__version__,
        description="Generate images with Kling AI over MCP (`/mcp`) or REST.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=settings.max_body_bytes)
    add_health_routes(app, tenant_store)
    app.include_router(build_api_router(service, authenticator))
    if settings.admin_token is not None:
        app.include_router(build_admin_router(directory, settings.admin_token))
    # Mounted last: our own routes match first, and /mcp is served without a 307 redirect.
    app.mount("/", McpAuthMiddleware(mcp_app, authenticator))
    return Gateway(settings=settings, directory=directory, service=service, app=app)


def add_health_routes(app: FastAPI, store: TenantStore) -> None:
    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process serves requests."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "The store is unreachable"}})
    async def readyz() -> JSONResponse:
        """Readiness: the store answers."""
        try:
            await store.ping()
        except (RedisError, OSError):
            return JSONResponse({"status": "unavailable", "store": "unreachable"}, status_code=503)
        return JSONResponse({"status": "ok"})


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app (uvicorn factory: `app.main:create_app`); settings default to the `KGW_*` environment."""
    return build_gateway(settings or Settings()).app
