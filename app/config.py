"""Settings: one validated, immutable object read from `KGW_*` environment variables.

Only the composition root (`app.main.create_app`) and the CLI build a `Settings`; nothing reads the
environment at import time.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_KLING_BASE_URL = "https://api-singapore.klingai.com"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
MIN_SECRET_CHARS = 16


class Settings(BaseSettings):
    """Every knob of the gateway. The README keeps the table of these in sync."""

    model_config = SettingsConfigDict(env_prefix="KGW_", frozen=True, extra="ignore")

    redis_url: str | None = Field(
        default=None, description="Redis for all shared state; unset = in-process memory store (one process)"
    )
    redis_sentinels: Annotated[list[tuple[str, int]], NoDecode] = Field(
        default_factory=list,
        description="Redis Sentinels (host:port, comma-separated) naming the master, in place of KGW_REDIS_URL's host",
    )
    redis_sentinel_service: str = Field(default="mymaster", min_length=1, description="The master's name in Sentinel")
    redis_sentinel_password: SecretStr | None = Field(
        default=None, description="The sentinels' own password (their requirepass); the master's is in KGW_REDIS_URL"
    )
    kling_base_url: str = Field(default=DEFAULT_KLING_BASE_URL, description="Kling API base URL")
    public_url: str | None = Field(
        default=None, description="The URL clients use, e.g. https://mcp.example.com; drives allowed hosts"
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Extra Host headers accepted on /mcp (comma-separated; '*' = any)"
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Extra browser Origins accepted on /mcp (comma-separated)"
    )
    admin_token: SecretStr | None = Field(default=None, description="Enables /admin; unset = admin API off")
    key_pepper: SecretStr | None = Field(
        default=None, description="Server secret that API keys are hashed under (required with Redis)"
    )
    master_key: SecretStr | None = Field(
        default=None, description="Fernet key(s), comma-separated, sealing Kling secrets at rest (required with Redis)"
    )
    key_environment: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]{1,12}$",
        description="Names this deployment's keys (kgw_<env>_...) so keys of another environment are refused",
    )
    tenants_file: str | None = Field(default=None, description="TOML file of tenants applied at start (GitOps)")
    oidc_issuer: str | None = Field(default=None, description="OAuth issuer whose JWT access tokens are accepted")
    oidc_jwks_url: str | None = Field(default=None, description="The issuer's JWKS URL; unset = discovered")
    oidc_tenant_claim: str = Field(default="tenant", description="Token claim naming the tenant (id or name)")
    oidc_scopes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["images:generate"], description="Scopes a token needs (comma-separated)"
    )
    default_wait_seconds: int = Field(default=45, ge=0, description="MCP generate_image wait when not given")
    max_wait_seconds: int = Field(default=300, ge=0, description="Upper bound for any wait_seconds")
    kling_timeout_seconds: float = Field(default=30.0, gt=0, description="Overall deadline of one Kling call")
    kling_max_connections: int = Field(default=100, ge=1, description="Pooled connections to Kling per process")
    poll_interval_seconds: float = Field(default=1.0, gt=0, description="First poll delay while waiting on a task")
    usage_flush_seconds: float = Field(
        default=1.0, ge=0, description="With Redis: how often usage counts are written (0: each as it happens)"
    )
    queue_timeout_seconds: float = Field(
        default=30.0, ge=0, description="Longest wait for free image slots on a Kling account before answering 429"
    )
    lease_ttl_seconds: float = Field(
        default=120.0, gt=0, description="Concurrency leases of a crashed replica come back after this"
    )
    limits_on_redis_failure: Literal["refuse", "local"] = Field(
        default="refuse",
        description="When Redis fails: refuse generation with 503, or fall back to per-replica limits",
    )
    breaker_failures: int = Field(
        default=5, ge=1, description="Consecutive failures of a Kling account that pause calls to it"
    )
    breaker_open_seconds: float = Field(default=10.0, gt=0, description="How long those calls stay paused")
    kling_webhook_secret: SecretStr | None = Field(
        default=None, description="Standard Webhooks secret (whsec_...) to verify Kling's callbacks with"
    )
    allow_http_references: bool = Field(
        default=False, description="Accept http:// (not only https://) reference-image URLs"
    )
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts that may receive webhook_url results although private or http (comma-separated)",
    )
    legacy_sse: bool = Field(
        default=True,
        description="Serve the legacy HTTP+SSE transport (/sse, /messages/); its sessions live in one process",
    )
    replicas_hint: int = Field(
        default=2, ge=1, description="Replicas to divide limits by in the 'local' fallback (so N replicas stay within)"
    )
    full_gc_every_seconds: float = Field(
        default=300.0,
        ge=0,
        description="Full garbage collections on this clock rather than on heap growth (0 = Python's default)",
    )
    # Inline base64 reference images may be 10 MB, which is about 13.4 MB of base64.
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="Largest accepted request body")

    @field_validator("allowed_hosts", "allowed_origins", "oidc_scopes", "webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _sentinel_addresses(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            return value
        return [_host_and_port(item) if isinstance(item, str) else item for item in value]

    @model_validator(mode="after")
    def _sentinels_need_a_redis_url(self) -> Settings:
        # KGW_REDIS_URL still turns Redis on and gives the master's password, db and TLS; only its host is replaced.
        if self.redis_sentinels and urlsplit(self.redis_url or "").scheme not in ("redis", "rediss"):
            raise ValueError("KGW_REDIS_SENTINELS needs a redis:// or rediss:// KGW_REDIS_URL (its host is ignored)")
        return self

    @field_validator("admin_token", "key_pepper")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty or short secret would let anyone in (an empty admin token matches an absent header).
        if value is not None and len(value.get_secret_value()) < MIN_SECRET_CHARS:
            raise ValueError(f"must be at least {MIN_SECRET_CHARS} characters; unset it to turn the feature off")
        return value

    @field_validator("public_url", "kling_base_url", "oidc_issuer", "oidc_jwks_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an absolute http(s) URL")
        return value.rstrip("/")

    def mcp_allowed_hosts(self) -> list[str]:
        """Host headers accepted on /mcp: loopback always, plus the public URL's host and the extras."""
        hosts = [pattern for host in LOOPBACK_HOSTS for pattern in (host, f"{host}:*")]
        if self.public_url:
            netloc = urlsplit(self.public_url).netloc
            hosts += [netloc, f"{netloc.split(':')[0]}:*"]
        return hosts + self.allowed_hosts

    def mcp_allowed_origins(self) -> list[str]:
        origins = [f"{scheme}://{host}:*" for scheme in ("http", "https") for host in LOOPBACK_HOSTS]
        origins += [f"{scheme}://{host}" for scheme in ("http", "https") for host in LOOPBACK_HOSTS]
        if self.public_url:
            parts = urlsplit(self.public_url)
            origins.append(f"{parts.scheme}://{parts.netloc}")
        return origins + self.allowed_origins

    def mcp_url(self) -> str | None:
        return f"{self.public_url}/mcp" if self.public_url else None

    def host_check_disabled(self) -> bool:
        return "*" in self.allowed_hosts


def _host_and_port(text: str) -> tuple[str, int]:
    """`host:port`, `[v6 address]:port` -> (host, port); a ValueError names the expected form."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)
