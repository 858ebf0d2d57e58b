"""Kling's status callbacks, fanned in across replicas.

Every create carries `callback_url = KGW_PUBLIC_URL/callbacks/kling/<token>`, where the token is the task's
`external_task_id` and an HMAC of it under the server's key pepper: unguessable, and checkable without a
lookup. Whichever replica receives a callback records the new state and announces it; every replica's
TaskFollower hears it and wakes its waiters at once, so a result reaches the caller without waiting for the
next poll. Polling stays as the baseline (Kling documents no callback retries).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from redis.asyncio import Redis

from app.kling import KlingTask
from app.lifecycle import subscribed
from app.tasks import TASK_UPDATES_CHANNEL, TaskRecord, TaskStore, record_from_json

logger = logging.getLogger(__name__)
CALLBACK_PATH = "/callbacks/kling"
SIGNATURE_TOLERANCE_S = 300


class CallbackTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, external_task_id: str) -> str:
        digest = hmac.new(self._key, f"callback\0{external_task_id}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:18]).decode()

    def token_for(self, external_task_id: str) -> str:
        return f"{external_task_id}.{self._mac(external_task_id)}"

    def external_task_id(self, token: str) -> str | None:
        """The task the token was made for, or None for a forged or mangled token."""
        external_task_id, _, mac = token.rpartition(".")
        if not external_task_id or not hmac.compare_digest(mac.encode(), self._mac(external_task_id).encode()):
            return None
        return external_task_id


def verify_standard_webhook(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    """Standard Webhooks signature (reference/kling-api.md §9): HMAC-SHA256 over "{id}.{timestamp}.{body}"."""
    msg_id, timestamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not msg_id or not timestamp.isdigit() or abs(time.time() - int(timestamp)) > SIGNATURE_TOLERANCE_S:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest())
    signatures = [sig.removeprefix("v1,") for sig in headers.get("webhook-signature", "").split() if sig[:3] == "v1,"]
    return any(hmac.compare_digest(expected.decode(), signature) for signature in signatures)


class TaskUpdates:
    """Fan-out of task states to every replica over Redis pub/sub (nothing to fan out to without Redis). The
    task store publishes a state as it records it (`TaskStore.save(..., announce=True)`); this hears them."""

    def __init__(self, redis: Redis | None) -> None:
        self._redis = redis

    def listening(self, heard: Callable[[TaskRecord], None]) -> contextlib.AbstractAsyncContextManager[None]:
        """Hear other replicas' updates for the app's lifetime; polling covers any gap in the channel."""
        return subscribed(self._redis, TASK_UPDATES_CHANNEL, lambda data: heard(record_from_json(data)), lambda: None)


def build_callback_router(
    tokens: CallbackTokens,
    tasks: TaskStore,
    announce: Callable[[TaskRecord], Awaitable[None]],
    webhook_secret: str | None,
) -> APIRouter:
    router = APIRouter(tags=["callbacks"])

    @router.post(f"{CALLBACK_PATH}/{{token}}", include_in_schema=False)
    async def kling_callback(token: str, request: Request) -> JSONResponse:
        """Kling's status change for one task: recorded, and fanned out to every replica's waiters."""
        body = await request.body()
        external_task_id = tokens.external_task_id(token)
        if external_task_id is None:
            return JSONResponse({"error": {"type": "not_found", "message": "unknown callback"}}, status_code=404)
        if webhook_secret is not None and not verify_standard_webhook(webhook_secret, request.headers, body):
            return JSONResponse({"error": {"type": "unauthorized", "message": "bad signature"}}, status_code=401)
        try:
            task = KlingTask.model_validate_json(body)
        except ValidationError:
            return JSONResponse({"error": {"type": "invalid_request", "message": "not a task"}}, status_code=422)
        record = await tasks.get(task.task_id)
        if record is None or record.external_task_id != external_task_id:
            # Not (yet) recorded, or not the task this token was made for: polling will catch up.
            return JSONResponse({"ok": True, "recorded": False})
        latest = record.updated_from(task)
        # Saved (and published to every replica) only if no newer state was recorded meanwhile (a poll answer on
        # another replica, say); then this replica's waiters learn of it too.
        if latest.supersedes(record) and await tasks.save(latest, announce=True):
            await announce(latest)
        return JSONResponse({"ok": True, "recorded": True})

    return router
