"""Per-tenant usage counters (per UTC day, per API key) and the admin audit log; memory and Redis backends.

Usage answers "how much did this tenant use, and through which key": requests that reached a use case,
Kling tasks accepted and images in them. The audit log answers "who changed tenants, keys or credentials".
Both are written on hot or sensitive paths, so a write is one Redis round trip and never holds a secret.

Callers must never pass secrets in audit details: they are stored in Redis and logged in clear. As a
guard, detail keys that look like secrets are refused (see `check_details`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from itertools import islice
from typing import Protocol

from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

audit_logger = logging.getLogger("app.audit")

COUNTERS = ("requests", "tasks", "images")
_KEY_FIELD_PREFIX = "k:"
_DAY_S = 86_400
# Detail keys containing these words are refused, whatever their value: a refused audit entry is a bug
# found early, a logged secret is an incident.
_SECRET_WORDS = ("secret", "password", "token", "key")
_ALLOWED_DETAIL_KEYS = frozenset({"key_id", "access_key"})  # identifiers, not secrets


@dataclass(frozen=True)
class Counts:
    requests: int = 0  # calls that reached the use case (generate or status) for this tenant/key
    tasks: int = 0  # Kling tasks accepted
    images: int = 0  # images in accepted tasks (sum of n)


@dataclass(frozen=True)
class DailyUsage:
    day: date  # UTC day
    total: Counts
    by_key: dict[str, Counts]  # key id (or e.g. "oauth:<subject>") -> counts; never ""


class UsageStore(Protocol):
    async def record(
        self,
        tenant_id: str,
        key_id: str,
        *,
        requests: int = 0,
        tasks: int = 0,
        images: int = 0,
        day: date | None = None,
    ) -> None:
        """Add to the tenant's counters for `day` (default: today, UTC), in total and for `key_id`."""

    async def tenant_usage(self, tenant_id: str, days: int = 30, *, today: date | None = None) -> list[DailyUsage]:
        """The `days` days ending `today`, newest first; days without any counts are omitted."""

    async def tenants_usage(
        self, tenant_ids: Sequence[str], days: int = 30, *, today: date | None = None
    ) -> dict[str, list[DailyUsage]]: ...


@dataclass(frozen=True)
class AuditEntry:
    at: float  # unix seconds
    actor: str  # "admin-api" | "cli" | "tenants-file" | ...
    action: str  # e.g. "tenant.create", "key.issue", "key.revoke", "key.rotate", "master_key.rotate"
    target: str  # e.g. tenant id or key id
    details: dict[str, str]  # small, never secrets


class AuditLog(Protocol):
    async def append(self, actor: str, action: str, target: str, details: Mapping[str, str] | None = None) -> None:
        """Record and log one entry. Raises ValueError for a details key that looks like a secret."""

    async def recent(self, limit: int = 100) -> list[AuditEntry]:
        """At most `limit` entries, newest first."""


# --- usage: shared between backends -------------------------------------------------------------------------


def utc_today() -> date:
    return datetime.now(UTC).date()


def check_growth(requests: int, tasks: int, images: int) -> None:
    """Usage only grows: a negative amount is the caller's bug, refused where it is made."""
    for counter, amount in zip(COUNTERS, (requests, tasks, images), strict=True):
        if amount < 0:
            raise ValueError(f"usage only grows: {counter}={amount}")


def _increments(key_id: str, requests: int, tasks: int, images: int) -> dict[str, int]:
    """The hash fields to add to, without zeros. Both backends store a day as these same fields.

    Per key, fields are `k:{key_id}:{counter}`; a key id may contain ':' ("oauth:<subject>"), which is
    why parsing splits on the last ':'. An empty key id counts toward the total only.
    """
    check_growth(requests, tasks, images)
    fields: dict[str, int] = {}
    for counter, amount in zip(COUNTERS, (requests, tasks, images), strict=True):
        if amount:
            fields[counter] = amount
            if key_id:
                fields[f"{_KEY_FIELD_PREFIX}{key_id}:{counter}"] = amount
    return fields


def _daily_usage(day: date, fields: Mapping[str, int]) -> DailyUsage:
    total: dict[str, int] = {}
    by_key: dict[str, dict[str, int]] = {}
    for name, value in fields.items():
        if name in COUNTERS:
            total[name] = value
        elif name.startswith(_KEY_FIELD_PREFIX):
            key_id, _, counter = name[len(_KEY_FIELD_PREFIX) :].rpartition(":")
            if key_id and counter in COUNTERS:
                by_key.setdefault(key_id, {})[counter] = value
        # Anything else was written by a newer version; ignoring it keeps old readers working.
    return DailyUsage(
        day=day,
        total=Counts(**total),
        by_key={key_id: Counts(**counts) for key_id, counts in sorted(by_key.items())},
    )


def _window(days: int, today: date | None, retention_days: int) -> list[date]:
    """The days to read, newest first. Nothing older than the retention exists, so it is never asked for."""
    last = today if today is not None else utc_today()
    return [last - timedelta(days=offset) for offset in range(min(days, retention_days))]


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be at least 1, not {value}")


# --- usage: backends --------------------------------------------------------------------------------------------


class MemoryUsageStore:
    """In-process backend. Keeps the latest `retention_days` days recorded per tenant, so it stays bounded
    without a clock; a record has no await inside, so concurrent records cannot interleave."""

    def __init__(self, retention_days: int = 400) -> None:
        _check_positive("retention_days", retention_days)
        self._retention_days = retention_days
        self._days: dict[str, dict[date, Counter[str]]] = {}

    async def record(
        self,
        tenant_id: str,
        key_id: str,
        *,
        requests: int = 0,
        tasks: int = 0,
        images: int = 0,
        day: date | None = None,
    ) -> None:
        fields = _increments(key_id, requests, tasks, images)
        if not fields:
            return
        tenant_days = self._days.setdefault(tenant_id, {})
        tenant_days.setdefault(day or utc_today(), Counter()).update(fields)
        while len(tenant_days) > self._retention_days:
            del tenant_days[min(tenant_days)]

    async def tenant_usage(self, tenant_id: str, days: int = 30, *, today: date | None = None) -> list[DailyUsage]:
        tenant_days = self._days.get(tenant_id, {})
        window = _window(days, today, self._retention_days)
        return [_daily_usage(day, tenant_days[day]) for day in window if day in tenant_days]

    async def tenants_usage(
        self, tenant_ids: Sequence[str], days: int = 30, *, today: date | None = None
    ) -> dict[str, list[DailyUsage]]:
        return {tenant_id: await self.tenant_usage(tenant_id, days, today=today) for tenant_id in tenant_ids}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisUsageStore:
    """Redis backend: one hash per (tenant, UTC day), `{ns}:usage:{<tenant id>}:YYYY-MM-DD`.

    The tenant id is a hash tag, so on Redis Cluster a tenant's days share a slot. Each write renews the
    hash's TTL to `retention_days` (relative, not tied to the day's date, so back-dated records and tests
    with fixed dates behave the same whenever they run).
    """

    def __init__(self, redis: Redis, namespace: str = "kgw", retention_days: int = 400) -> None:
        _check_positive("retention_days", retention_days)
        self._redis = redis
        self._ns = namespace
        self._retention_days = retention_days

    def _key(self, tenant_id: str, day: date) -> str:
        return f"{self._ns}:usage:{{{tenant_id}}}:{day.isoformat()}"

    async def record(
        self,
        tenant_id: str,
        key_id: str,
        *,
        requests: int = 0,
        tasks: int = 0,
        images: int = 0,
        day: date | None = None,
    ) -> None:
        fields = _increments(key_id, requests, tasks, images)
        if not fields:
            return  # nothing to add: no round trip, and no empty hash kept alive
        key = self._key(tenant_id, day or utc_today())
        # HINCRBY is atomic per field, so concurrent replicas never lose an increment; the pipeline only
        # saves round trips, and needs no MULTI because a partially applied record is still a valid count.
        async with self._redis.pipeline(transaction=False) as pipe:
            for name, amount in fields.items():
                pipe.hincrby(key, name, amount)
            pipe.expire(key, self._retention_days * _DAY_S)
            await pipe.execute()

    async def tenant_usage(self, tenant_id: str, days: int = 30, *, today: date | None = None) -> list[DailyUsage]:
        return (await self.tenants_usage([tenant_id], days, today=today))[tenant_id]

    async def tenants_usage(
        self, tenant_ids: Sequence[str], days: int = 30, *, today: date | None = None
    ) -> dict[str, list[DailyUsage]]:
        window = _window(days, today, self._retention_days)
        wanted = [(tenant_id, day) for tenant_id in dict.fromkeys(tenant_ids) for day in window]
        if not wanted:
            return {tenant_id: [] for tenant_id in tenant_ids}
        # One round trip for every tenant and day; a missing hash reads as {} and is skipped.
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant_id, day in wanted:
                pipe.hgetall(self._key(tenant_id, day))
            hashes: list[dict[bytes | str, bytes | str]] = await pipe.execute()
        usage: dict[str, list[DailyUsage]] = {tenant_id: [] for tenant_id in tenant_ids}
        for (tenant_id, day), raw in zip(wanted, hashes, strict=True):
            if raw:
                usage[tenant_id].append(_daily_usage(day, {_text(name): int(value) for name, value in raw.items()}))
        return usage


# --- audit --------------------------------------------------------------------------------------------------------


def check_details(details: Mapping[str, str] | None) -> dict[str, str]:
    """A copy of `details`; ValueError when a key names something secret (only `key_id`, `access_key` pass)."""
    if not details:
        return {}
    for name in details:
        lowered = name.lower()
        if lowered not in _ALLOWED_DETAIL_KEYS and any(word in lowered for word in _SECRET_WORDS):
            raise ValueError(f"audit details must not hold secrets; refusing the key {name!r}")
    return dict(details)


def _log_value(value: str) -> str:
    # Quote anything that could split or forge a log line (spaces, newlines, '=', quotes).
    if value and not any(char.isspace() or char in '="\\' for char in value):
        return value
    return json.dumps(value)


def _log_audit(actor: str, action: str, target: str, details: Mapping[str, str]) -> None:
    pairs: Iterable[tuple[str, str]] = [("actor", actor), ("action", action), ("target", target), *details.items()]
    audit_logger.info("audit %s", " ".join(f"{_log_value(name)}={_log_value(value)}" for name, value in pairs))


class MemoryAuditLog:
    """In-process backend: the latest `max_entries` entries."""

    def __init__(self, max_entries: int = 10_000) -> None:
        _check_positive("max_entries", max_entries)
        self._entries: deque[AuditEntry] = deque(maxlen=max_entries)

    async def append(self, actor: str, action: str, target: str, details: Mapping[str, str] | None = None) -> None:
        checked = check_details(details)
        _log_audit(actor, action, target, checked)
        self._entries.append(AuditEntry(at=time.time(), actor=actor, action=action, target=target, details=checked))

    async def recent(self, limit: int = 100) -> list[AuditEntry]:
        return list(islice(reversed(self._entries), max(limit, 0)))


def _entry_from_stream(fields: Mapping[bytes | str, bytes | str]) -> AuditEntry:
    text = {_text(name): _text(value) for name, value in fields.items()}
    return AuditEntry(
        at=float(text.get("at", "0")),
        actor=text.get("actor", ""),
        action=text.get("action", ""),
        target=text.get("target", ""),
        details={str(name): str(value) for name, value in json.loads(text.get("details") or "{}").items()},
    )


class RedisAuditLog:
    """Redis backend: the stream `{ns}:audit`, trimmed with `MAXLEN ~ max_entries`.

    Approximate trimming drops whole stream nodes (100 entries by default), so the stream may hold up to
    about a node more than `max_entries`; in exchange each trim is cheap.
    """

    def __init__(self, redis: Redis, namespace: str = "kgw", max_entries: int = 100_000) -> None:
        _check_positive("max_entries", max_entries)
        self._redis = redis
        self._key = f"{namespace}:audit"
        self._max_entries = max_entries

    async def append(self, actor: str, action: str, target: str, details: Mapping[str, str] | None = None) -> None:
        checked = check_details(details)
        # Logged before the write: the action already happened, so its trace must survive a Redis outage.
        _log_audit(actor, action, target, checked)
        fields: dict[FieldT, EncodableT] = {
            "at": repr(time.time()),
            "actor": actor,
            "action": action,
            "target": target,
            "details": json.dumps(checked),
        }
        await self._redis.xadd(self._key, fields, maxlen=self._max_entries, approximate=True)

    async def recent(self, limit: int = 100) -> list[AuditEntry]:
        if limit < 1:
            return []
        entries = await self._redis.xrevrange(self._key, count=limit) or []
        return [_entry_from_stream(fields) for _, fields in entries if fields]
