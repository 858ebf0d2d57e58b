"""The composition root: `build_gateway(settings)` builds every part and wires it; the lifespan owns the
MCP session manager, the pooled HTTP client and the Redis pool, and closes them in reverse order."""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from mcp.server import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from redis import DriverInfo
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from starlette.types import ASGIApp

from app import __version__
from app.admin import build_admin_router
from app.api import RestRequestGuard, build_api_router, install_error_handlers
from app.auth import Authenticator, KeyChangeBroadcast, McpAuthMiddleware, OAuthChallenge
from app.breaker import Breakers
from app.callbacks import CALLBACK_PATH, CallbackTokens, TaskUpdates, build_callback_router
from app.collector import full_collections_every
from app.config import Settings
from app.follower import TaskFollower
from app.http_pool import create_http_client, create_kling_pool
from app.images import ImageService, ServiceTimings
from app.kling import KlingClient
from app.lifecycle import Drain
from app.mcp_server import MCP_PATH, McpTransports, build_mcp_server, legacy_sse_app
from app.metrics import (
    CountingConnectionPool,
    CountingRetry,
    forget_dead_workers,
    forget_this_process,
    metrics_endpoint,
)
from app.oauth import OAuthConfig, OAuthVerifier, protected_resource_metadata
from app.observability import ObservabilityMiddleware
from app.previews import PreviewMaker
from app.ratelimit import (
    AccountGovernor,
    FallbackGovernor,
    FallbackLimiter,
    Limiter,
    MemoryAccountGovernor,
    MemoryLimiter,
    RedisAccountGovernor,
    RedisLimiter,
)
from app.references import ReferenceGuard
from app.script_batches import ScriptBatcher
from app.sealing import SecretSealer, parse_master_keys
from app.sentinel import SentinelTarget, following_failovers, sentinel_master
from app.status_queries import BATCH_WINDOW_S, FALLBACK_BATCH_WINDOW_S, StatusQueries
from app.tasks import MemoryTaskStore, RedisTaskStore, TaskStore
from app.tenants import KeyFormat, MemoryTenantStore, RedisTenantStore, TenantDirectory, TenantStore
from app.tenants_file import apply_tenants_file, load_tenants_file
from app.tracing import Tracing, configure_tracing
from app.usage import AuditLog, MemoryAuditLog, MemoryUsageStore, RedisAuditLog, RedisUsageStore, UsageStore
from app.usage_buffer import BufferedUsage
from app.webhooks import WebhookSender

logger = logging.getLogger(__name__)
REDIS_TIMEOUT_S = 1.0
PRM_PATH = "/.well-known/oauth-protected-resource"


class ConfigurationError(Exception):
    """The settings cannot run a safe gateway; the message says what to set."""


@dataclass(frozen=True)
class Stores:
    tenants: TenantStore
    tasks: TaskStore
    usage: UsageStore
    audit: AuditLog
    pepper: bytes
    sealer: SecretSealer


@dataclass(frozen=True)
class Gateway:
    """The wired parts; the CLI's demo and admin verbs use `directory` directly."""

    settings: Settings
    directory: TenantDirectory
    app: FastAPI


def create_redis(
    url: str, max_connections: int = 200, retries: int = 1, sentinel: SentinelTarget | None = None
) -> Redis:
    """One pool per process. Short timeouts and a single retry: a hung Redis must fail a request quickly,
    not hang it. A blocking pool, because the default one raises instead of waiting once it is full. With
    `sentinel`, the pool connects to the master the sentinels name instead of `url`'s host."""
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": REDIS_TIMEOUT_S,
        "socket_timeout": REDIS_TIMEOUT_S,
        "socket_connect_timeout": REDIS_TIMEOUT_S,
        "retry": CountingRetry(NoBackoff(), retries),
        "health_check_interval": 30,
        # Built once: left to each connection, redis-py looks its own version up in the installed packages'
        # metadata every time it opens one, 12-16 ms of the event loop each (measured while a burst of work
        # grew the pool).
        "driver_info": DriverInfo(),
    }
    if sentinel is not None:
        return sentinel_master(url, sentinel, **options)
    return Redis.from_pool(CountingConnectionPool.from_url(url, **options))


def open_redis(settings: Settings, retries: int = 1) -> Redis | None:
    """The Redis client these settings describe (direct, or through Sentinel); None without Redis."""
    if settings.redis_url is None:
        return None
    sentinel = None
    if settings.redis_sentinels:
        password = settings.redis_sentinel_password
        sentinel = SentinelTarget(
            tuple(settings.redis_sentinels),
            settings.redis_sentinel_service,
            password.get_secret_value() if password else None,
        )
    return create_redis(settings.redis_url, retries=retries, sentinel=sentinel)


def open_stores(settings: Settings, redis: Redis | None) -> Stores:
    """The store backends, the API-key pepper and the secret sealer for these settings."""
    if redis is None:
        # The memory store lives and dies with this process, and so may its pepper and master key.
        pepper = settings.key_pepper.get_secret_value().encode() if settings.key_pepper else secrets.token_bytes(32)
        sealer = _sealer(settings) if settings.master_key else SecretSealer.ephemeral()
        return Stores(MemoryTenantStore(), MemoryTaskStore(), MemoryUsageStore(), MemoryAuditLog(), pepper, sealer)
    if settings.key_pepper is None:
        raise ConfigurationError(
            "KGW_KEY_PEPPER is required with KGW_REDIS_URL: API keys stored in Redis are hashed under it. "
            'Generate one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'
        )
    if settings.master_key is None:
        raise ConfigurationError(
            "KGW_MASTER_KEY is required with KGW_REDIS_URL: Kling secret keys are sealed under it. "
            "Generate one with: kling-gateway master-key new"
        )
    pepper = settings.key_pepper.get_secret_value().encode()
    return Stores(
        RedisTenantStore(redis), RedisTaskStore(redis), RedisUsageStore(redis), RedisAuditLog(redis), pepper,
        _sealer(settings),
    )  # fmt: skip


def _sealer(settings: Settings) -> SecretSealer:
    assert settings.master_key is not None
    try:
        return SecretSealer(parse_master_keys(settings.master_key.get_secret_value()))
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from exc


def open_limits(settings: Settings, redis: Redis | None) -> tuple[Limiter, AccountGovernor]:
    ttl = settings.lease_ttl_seconds
    if redis is None:
        return MemoryLimiter(lease_ttl_s=ttl), MemoryAccountGovernor(lease_ttl_s=ttl)
    local = settings.limits_on_redis_failure == "local"
    batches = ScriptBatcher(redis)  # shared: a submission's admission and slot, and a task's two releases, pair up
    limiter = FallbackLimiter(
        RedisLimiter(redis, lease_ttl_s=ttl, batches=batches),
        MemoryLimiter(lease_ttl_s=ttl) if local else None,
        settings.replicas_hint,
    )
    governor = FallbackGovernor(
        RedisAccountGovernor(redis, lease_ttl_s=ttl, batches=batches),
        MemoryAccountGovernor(lease_ttl_s=ttl) if local else None,
        settings.replicas_hint,
    )
    return limiter, governor


def oauth_config(settings: Settings) -> OAuthConfig | None:
    if settings.oidc_issuer is None:
        return None
    audience = settings.mcp_url()
    if audience is None:
        raise ConfigurationError("KGW_OIDC_ISSUER needs KGW_PUBLIC_URL: tokens must be addressed to this gateway")
    return OAuthConfig(
        issuer=settings.oidc_issuer,
        audience=audience,
        jwks_url=settings.oidc_jwks_url,
        tenant_claim=settings.oidc_tenant_claim,
        required_scopes=tuple(settings.oidc_scopes),
    )


def admin_directory(settings: Settings, redis: Redis) -> tuple[TenantDirectory, Stores]:
    """The directory for administration outside a running gateway (the CLI): changes to keys are still
    broadcast, so running replicas forget a revoked key at once."""
    stores = open_stores(settings, redis)
    broadcast = KeyChangeBroadcast(redis)
    directory = TenantDirectory(
        stores.tenants, stores.pepper, stores.sealer, KeyFormat(settings.key_environment), broadcast.publish
    )
    return directory, stores


def build_gateway(settings: Settings, tracing: Tracing | None = None) -> Gateway:
    """Build and wire every part. Tracing, unless given, is what the `OTEL_*` environment configures."""
    if tracing is None:
        tracing = configure_tracing()
    redis = open_redis(settings)
    # The limiter's own client never retries: a timed-out script may have run, and a retry would charge twice.
    limits_redis = open_redis(settings, retries=0)
    stores = open_stores(settings, redis)
    usage_writer = None
    if redis is not None and settings.usage_flush_seconds > 0:
        # Counted in the process and written in batches: a round trip fewer on every request (app/usage_buffer.py).
        usage_writer = BufferedUsage(stores.usage)
        stores = replace(stores, usage=usage_writer)
    kling_pool = create_kling_pool(settings.kling_max_connections)
    oauth = oauth_config(settings)
    broadcast = KeyChangeBroadcast(redis) if redis is not None else None

    async def key_changed(key_or_tenant: str) -> None:
        authenticator.forget(key_or_tenant)  # this replica at once; the others through Redis
        if broadcast is not None:
            await broadcast.publish(key_or_tenant)

    directory = TenantDirectory(
        stores.tenants, stores.pepper, stores.sealer, KeyFormat(settings.key_environment), key_changed
    )
    challenge, oauth_http = None, None
    if oauth is not None:
        oauth_http = create_http_client(max_connections=10)  # the issuer's keys and metadata
        challenge = OAuthChallenge(oauth, OAuthVerifier(oauth, oauth_http), f"{settings.public_url}{PRM_PATH}/mcp")
    authenticator = Authenticator(directory, challenge)
    breakers = Breakers(failure_threshold=settings.breaker_failures, open_s=settings.breaker_open_seconds)
    kling = KlingClient(
        kling_pool, settings.kling_base_url, deadline_s=settings.kling_timeout_seconds, breakers=breakers
    )
    limiter, governor = open_limits(settings, limits_redis)
    updates = TaskUpdates(redis)
    references = ReferenceGuard(
        allow_http=settings.allow_http_references, webhook_hosts=frozenset(settings.webhook_allowed_hosts)
    )
    webhook_http = create_http_client(max_connections=20)  # callers' receivers: not Kling's pool
    webhooks = WebhookSender(webhook_http, stores.tasks, directory.webhook_secret, references)
    callbacks = settings.public_url is not None  # Kling calls back: polling is only the slow fallback
    queries = StatusQueries(kling, window_s=FALLBACK_BATCH_WINDOW_S if callbacks else BATCH_WINDOW_S)
    follower = TaskFollower(
        kling, stores.tasks, first_interval_s=settings.poll_interval_seconds,
        on_finished=webhooks.task_finished,
        # With Redis, replicas adopt each other's tasks when one stops; alone in memory there is nobody to.
        credentials_of=directory.kling_credentials_by_id if redis is not None else None,
        callbacks=callbacks,
        lease_refresh_s=settings.lease_ttl_seconds / 3, queries=queries,
    )  # fmt: skip
    drain = Drain()
    tokens = CallbackTokens(stores.pepper)

    def callback_url_for(external_task_id: str) -> str | None:
        # Kling must be able to reach the gateway, so only with a public URL.
        if settings.public_url is None:
            return None
        return f"{settings.public_url}{CALLBACK_PATH}/{tokens.token_for(external_task_id)}"

    service = ImageService(
        kling,
        stores.tasks,
        stores.usage,
        directory.kling_credentials_by_id,
        limiter,
        governor,
        follower,
        service_timings(settings),
        drain,
        references,
        callback_url_for,
        limits_in_redis=limits_redis is not None,
    )
    # Apart from Kling's pool, so slow image hosts never take the connections that API calls need.
    preview_http = create_http_client(max_connections=20)
    mcp = build_mcp_server(service, default_wait_s=settings.default_wait_seconds, previews=PreviewMaker(preview_http),
                           traced=tracing is not None)  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if tracing is not None:
                # First in, last out: spans made while the other parts close are exported too.
                await stack.enter_async_context(tracing.active())
            for client in (redis, limits_redis):
                if client is not None:
                    stack.push_async_callback(client.aclose)
            await stack.enter_async_context(following_failovers(redis, limits_redis))
            if usage_writer is not None:
                # Its last flush comes once the parts entered after it have stopped, and before Redis closes.
                await stack.enter_async_context(usage_writer.flushing_every(settings.usage_flush_seconds))
            stack.push_async_callback(kling_pool.aclose)
            if oauth_http is not None:
                stack.push_async_callback(oauth_http.aclose)
            stack.push_async_callback(preview_http.aclose)
            stack.push_async_callback(webhook_http.aclose)
            stack.push_async_callback(webhooks.aclose)
            stack.push_async_callback(queries.aclose)  # after the follower's loops, its readers, have stopped
            stack.push_async_callback(follower.aclose)
            if settings.tenants_file:
                await apply_file(directory, stores.audit, settings.tenants_file)
            if broadcast is not None:
                await stack.enter_async_context(broadcast.listening(authenticator))
            await stack.enter_async_context(updates.listening(follower.heard))
            await stack.enter_async_context(follower.adopting())
            await stack.enter_async_context(mcp.session_manager.run())
            await stack.enter_async_context(full_collections_every(settings.full_gc_every_seconds))
            stack.enter_context(drain.on_signals())
            forget_dead_workers()
            stack.callback(forget_this_process)
            try:
                yield
            finally:
                drain.start()  # whatever stops the server, waiting callers get their answer first

    app = GatewayApp(
        title="Kling MCP Gateway",
        version=__version__,
        description="Generate images with Kling AI over MCP (`/mcp`) or REST.",
        lifespan=lifespan,
        # The gateway's own request span (app/tracing.py) covers every request, /mcp included, by route template;
        # FastAPI's would duplicate it and record raw paths, and callback paths hold a token.
        telemetry={"tracing": False},
    )
    install_error_handlers(app)
    app.add_middleware(RestRequestGuard, max_body_bytes=settings.max_body_bytes)
    streamable, legacy = mcp_transports(settings, mcp, authenticator)
    app.outermost = functools.partial(_observed_with_mcp_first, streamable=streamable, legacy=legacy)
    add_health_routes(app, stores.tenants, drain)
    # A FastAPI route, not Starlette's add_route: only FastAPI's routes name themselves in the scope, and the
    # route's name is what keeps scrapes out of the request log and off the "unmatched" label.
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    if oauth is not None:
        add_resource_metadata_routes(app, oauth)
    app.include_router(build_api_router(service, authenticator, stores.usage))
    secret = settings.kling_webhook_secret.get_secret_value() if settings.kling_webhook_secret else None
    app.include_router(build_callback_router(tokens, stores.tasks, follower.announce, secret))
    if settings.admin_token is not None:
        app.include_router(build_admin_router(directory, stores, settings.admin_token))
    return Gateway(settings=settings, directory=directory, app=app)


class GatewayApp(FastAPI):
    """FastAPI, with the gateway's own outermost layers (`outermost`, set before the first request) outside even
    FastAPI's error handling, which `add_middleware` cannot place."""

    outermost: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.outermost is None else self.outermost(stack)


def _observed_with_mcp_first(rest: ASGIApp, *, streamable: ASGIApp, legacy: ASGIApp | None) -> ASGIApp:
    """Outermost, the request id, timings and log line: they cover every answer, 413s, /mcp and FastAPI's
    last-resort 500 included (which, sent from inside them, would go out without the request id to report).
    Then MCP requests go straight to their transports, which answer their own errors: FastAPI's layers (its
    error handling, telemetry and body limit) would cost each call three more coroutines, and each waiting
    caller the objects they keep."""
    return ObservabilityMiddleware(McpTransports(rest, streamable, legacy))


def service_timings(settings: Settings) -> ServiceTimings:
    return ServiceTimings(
        max_wait_s=settings.max_wait_seconds,
        queue_timeout_s=settings.queue_timeout_seconds,
        # Longer than the longest submission: queue wait, create retries, the final create and lookups.
        claim_ttl_s=2 * settings.queue_timeout_seconds + 4 * settings.kling_timeout_seconds + 30,
    )


def mcp_transports(settings: Settings, mcp: MCPServer, authenticator: Authenticator) -> tuple[ASGIApp, ASGIApp | None]:
    """Streamable HTTP at /mcp and, unless turned off, the legacy HTTP+SSE transport (None when off), behind one
    authentication and one Host/Origin check."""
    transport_security = TransportSecuritySettings(
        enable_dns_rebinding_protection=not settings.host_check_disabled(),
        allowed_hosts=settings.mcp_allowed_hosts(),
        allowed_origins=settings.mcp_allowed_origins(),
    )
    streamable = mcp.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=True,  # any replica can serve any request
        json_response=False,  # SSE, so progress notifications reach the client while a tool waits
        max_request_body_size=settings.max_body_bytes,
        transport_security=transport_security,
    )
    legacy = None
    if settings.legacy_sse:
        legacy = legacy_sse_app(mcp, authenticator, transport_security, settings.max_body_bytes)
    return McpAuthMiddleware(streamable, authenticator), legacy


async def apply_file(directory: TenantDirectory, audit: AuditLog, path: str) -> None:
    applied = await apply_tenants_file(directory, load_tenants_file(path))
    for change, names in (("create", applied.created), ("update", applied.updated)):
        for name in names:
            kind, _, target = name.partition(" ")
            await audit.append("tenants-file", f"{kind}.{change}", target)
    logger.info("tenants file applied: %d created, %d updated", len(applied.created), len(applied.updated))


def add_health_routes(app: FastAPI, store: TenantStore, drain: Drain) -> None:
    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process serves requests."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "The store is unreachable"}})
    async def readyz() -> JSONResponse:
        """Readiness: the store answers and the replica is not shutting down."""
        if drain.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        try:
            await store.ping()
        except (RedisError, OSError):
            return JSONResponse({"status": "unavailable", "store": "unreachable"}, status_code=503)
        return JSONResponse({"status": "ok"})


def add_resource_metadata_routes(app: FastAPI, oauth: OAuthConfig) -> None:
    """RFC 9728 protected-resource metadata, so OAuth clients find the authorization server."""
    document = protected_resource_metadata(oauth)

    @app.get(f"{PRM_PATH}/mcp", tags=["oauth"], include_in_schema=False)
    @app.get(PRM_PATH, tags=["oauth"], include_in_schema=False)
    async def resource_metadata() -> JSONResponse:
        return JSONResponse(document, headers={"Cache-Control": "public, max-age=3600"})


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app (uvicorn factory: `app.main:create_app`); settings default to the `KGW_*` environment."""
    return build_gateway(settings or Settings()).app
