"""Per-request webhooks: `POST /generate` with a `webhook_url` gets the task's final result delivered there,
signed (Standard Webhooks) with the tenant's webhook secret, and retried with backoff until the receiver
answers 2xx.

The replica whose loop sees the task end delivers it; a Redis claim makes that one delivery per task even
when loops on several replicas see the end. Delivery runs in the background: a caller's answer never waits
for a receiver. The receiver's host is checked again right before each attempt (a name can start
resolving to a private address after the request was accepted).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import json
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx2
from redis.exceptions import RedisError
from standardwebhooks.webhooks import Webhook

from app.errors import InvalidRequest
from app.references import ReferenceGuard
from app.tasks import TaskRecord, TaskStore

logger = logging.getLogger(__name__)
# Seconds before each retry (full jitter up to this): about two minutes in all, then the result stays
# available from GET /tasks/{id} and the events stream.
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
DELIVERY_TIMEOUT_S = 10.0  # one attempt, connect to response headers; the body is never read
PER_TENANT_DELIVERIES = 4  # one tenant's slow receivers cannot take the whole pool
SecretOf = Callable[[str], Awaitable[str | None]]


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def signed_headers(secret: str, message_id: str, body: str, at: datetime) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, at, body),
    }


def webhook_body(record: TaskRecord, at: datetime) -> str:
    return json.dumps(
        {
            "type": f"image.task.{record.status.value}",
            "timestamp": at.isoformat(),
            "data": record.view().model_dump(mode="json", exclude_none=True),
        }
    )


@dataclass(frozen=True)
class Pinning:
    headers: dict[str, str]
    extensions: dict[str, str]


def pinned(url: str, address: str | None) -> tuple[str, Pinning]:
    """The URL to connect to the checked `address` instead of resolving the name again, with the Host header
    and TLS server name (SNI, and so the certificate check) still those of the name."""
    if address is None:
        return url, Pinning({}, {})
    target = httpx2.URL(url)
    host = target.host
    return str(target.copy_with(host=address)), Pinning({"host": host}, {"sni_hostname": host})


class WebhookSender:
    def __init__(
        self,
        http: httpx2.AsyncClient,
        tasks: TaskStore,
        secret_of: SecretOf,
        guard: ReferenceGuard,
        retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S,
    ) -> None:
        self._http = http
        self._tasks = tasks
        self._secret_of = secret_of
        self._guard = guard
        self._retry_delays_s = retry_delays_s
        self._pending: dict[asyncio.Task[None], str] = {}  # delivery → its task id
        self._per_tenant: dict[str, asyncio.Semaphore] = {}

    async def task_finished(self, record: TaskRecord) -> None:
        """Start delivering the final result, once per task across replicas."""
        if record.webhook_url is None:
            return
        try:
            if not await self._tasks.claim_webhook(record.task_id):
                return  # another replica's loop saw the end first and delivers it
        except RedisError:
            logger.warning("could not claim the webhook of task %s; delivering it from here", record.task_id)
        delivery = asyncio.create_task(
            self._deliver(record, record.webhook_url), name=f"webhook {record.task_id}", context=contextvars.Context()
        )
        self._pending[delivery] = record.task_id
        delivery.add_done_callback(self._delivered)

    def _delivered(self, delivery: asyncio.Task[None]) -> None:
        self._pending.pop(delivery, None)
        if not delivery.cancelled() and delivery.exception() is not None:
            logger.error("webhook delivery failed", exc_info=delivery.exception())

    async def _deliver(self, record: TaskRecord, url: str) -> None:
        try:
            secret = await self._secret_of(record.tenant_id)
        except Exception:
            logger.exception("could not open the webhook secret of tenant %s", record.tenant_id)
            return
        if secret is None:
            logger.warning("tenant %s has no webhook secret any more; not delivering", record.tenant_id)
            return
        message_id = f"msg_{record.task_id}_{record.status.value}"
        for attempt, delay in enumerate((0.0, *self._retry_delays_s)):
            await asyncio.sleep(random.uniform(0, delay))  # full jitter: receivers recovering are not stampeded
            try:
                address = await self._guard.check_webhook(url)
            except InvalidRequest as exc:
                logger.warning("not delivering the webhook of task %s: %s", record.task_id, exc.message)
                return
            at = datetime.now(UTC)
            body = webhook_body(record, at)
            target, pinning = pinned(url, address)
            headers = signed_headers(secret, message_id, body, at) | pinning.headers
            if await self._attempt(target, body, headers, pinning.extensions, record, attempt):
                return
        logger.warning("gave up delivering the webhook of task %s", record.task_id)

    async def _attempt(
        self, url: str, body: str, headers: dict[str, str], extensions: dict[str, str], record: TaskRecord, attempt: int
    ) -> bool:
        semaphore = self._per_tenant.setdefault(record.tenant_id, asyncio.Semaphore(PER_TENANT_DELIVERIES))
        async with semaphore:
            try:
                # Streamed and closed unread: only the status matters, and a receiver's body could be endless.
                async with (
                    asyncio.timeout(DELIVERY_TIMEOUT_S),
                    self._http.stream("POST", url, content=body, headers=headers, extensions=extensions) as response,
                ):
                    status = response.status_code
            except (httpx2.HTTPError, TimeoutError) as exc:
                logger.info("webhook of task %s, attempt %d: %s", record.task_id, attempt + 1, type(exc).__name__)
                return False
        if 200 <= status < 300:
            return True
        logger.info("webhook of task %s, attempt %d: HTTP %d", record.task_id, attempt + 1, status)
        return False

    async def aclose(self) -> None:
        """Shutdown: deliveries under way are handed back, so another replica's adoption sweep delivers them."""
        pending = dict(self._pending)
        for delivery in pending:
            delivery.cancel()
        for delivery, task_id in pending.items():
            with contextlib.suppress(asyncio.CancelledError):
                await delivery
            if not delivery.cancelled():
                continue  # it had just finished (delivered, or given up): nothing to hand back
            try:
                await self._tasks.release_webhook(task_id)
                await self._tasks.mark_followed(task_id, at=0.0)  # stale at once: the next sweep takes it
            except (RedisError, OSError):
                logger.warning("webhook of task %s is not delivered: could not hand it back", task_id)
