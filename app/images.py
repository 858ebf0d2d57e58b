"""ImageService: the one use case behind both edges (REST and MCP).

validate (already done by `GenerateRequest`) -> submit to the tenant's Kling account -> record the
task -> wait up to `wait_seconds`, reporting progress -> return the task's view. Neither edge talks to
Kling or the store directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from app.errors import Conflict, InvalidRequest, NotFound, error_from_kling
from app.kling import (
    KlingClient,
    KlingCredentials,
    KlingError,
    KlingFailure,
    KlingTask,
    KlingTransportError,
    build_generation_body,
)
from app.models import GenerateRequest, TaskStatus
from app.tasks import IdempotencyClaim, ProgressCallback, TaskRecord, TaskStore, wait_for_task
from app.tenants import Tenant, TenantPolicy
from app.usage import UsageStore

# How long a duplicate request waits for the first one (same idempotency key) to be accepted by Kling.
IDEMPOTENCY_WAIT_S = 10.0
_CODE_TASK_NOT_FOUND = 1203


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: a tenant, the Kling account its tasks run on, and the key used
    (`oauth:<subject>` for OAuth callers)."""

    tenant: Tenant
    credential_id: str
    kling: KlingCredentials
    key_id: str


def apply_policy(policy: TenantPolicy, request: GenerateRequest) -> GenerateRequest:
    """The request as the tenant's policy allows it; raises InvalidRequest naming the argument otherwise."""
    if policy.default_model and "model_name" not in request.model_fields_set:
        # Re-validated: the tenant's model may not accept what the caller asked of the default one.
        request = GenerateRequest.model_validate(
            request.model_dump(exclude_unset=True) | {"model_name": policy.default_model}
        )
    if policy.allowed_models is not None and request.model_name not in policy.allowed_models:
        allowed = ", ".join(policy.allowed_models)
        raise InvalidRequest(
            "model_name", f"{request.model_name} is not enabled for this tenant; use one of: {allowed}"
        )
    if request.num_images > policy.max_images_per_request:
        raise InvalidRequest(
            "num_images", f"this tenant may ask for at most {policy.max_images_per_request} per request"
        )
    return request


def request_fingerprint(request: GenerateRequest) -> str:
    """What makes two requests "the same" for an idempotency key: every argument but the wait."""
    fields = request.model_dump(exclude={"wait_seconds", "idempotency_key"})
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def external_task_id_for(tenant_id: str, idempotency_key: str | None) -> str:
    """Derived from (tenant, key) when there is a key, so a retry reaches the same Kling task."""
    if idempotency_key is None:
        return f"kgw-{uuid.uuid4().hex}"
    return "kgw-" + hashlib.sha256(f"{tenant_id}\0{idempotency_key}".encode()).hexdigest()[:32]


class ImageService:
    def __init__(
        self,
        kling: KlingClient,
        tasks: TaskStore,
        usage: UsageStore,
        credentials: Callable[[str], Awaitable[KlingCredentials | None]],
        *,
        max_wait_s: int,
        first_poll_interval_s: float,
    ) -> None:
        self._kling = kling
        self._tasks = tasks
        self._usage = usage
        self._credentials = credentials
        self._max_wait_s = max_wait_s
        self._first_poll_interval_s = first_poll_interval_s

    async def generate(
        self,
        principal: Principal,
        request: GenerateRequest,
        *,
        wait_s: int,
        on_progress: ProgressCallback | None = None,
    ) -> TaskRecord:
        """Start (or, for a repeated idempotency key, find) the task, then wait for it up to `wait_s`."""
        await self._usage.record(principal.tenant.id, principal.key_id, requests=1)
        request = apply_policy(principal.tenant.policy, request)
        if request.idempotency_key is None:
            record = await self._submit(principal, request)
        else:
            record = await self._submit_once(principal, request, request.idempotency_key)
        if on_progress is not None:
            await on_progress(record, 0.0)
        return await self._wait(principal, record, wait_s, on_progress)

    async def status(
        self,
        principal: Principal,
        task_id: str,
        *,
        wait_s: int = 0,
        on_progress: ProgressCallback | None = None,
    ) -> TaskRecord:
        """A task of the caller's own tenant; another tenant's task is reported as not found."""
        await self._usage.record(principal.tenant.id, principal.key_id, requests=1)
        record = await self._tasks.get(task_id)
        if record is None or record.tenant_id != principal.tenant.id:
            raise NotFound(f"no task {task_id!r} for this API key")
        if record.status.is_terminal:
            return record
        return await self._wait(principal, record, max(wait_s, 0), on_progress, refresh_first=True)

    async def _wait(
        self,
        principal: Principal,
        record: TaskRecord,
        wait_s: int,
        on_progress: ProgressCallback | None,
        *,
        refresh_first: bool = False,
    ) -> TaskRecord:
        kling = await self._kling_of(principal, record)

        async def fetch() -> KlingTask:
            try:
                return await self._kling.get_image_task(kling, record.task_id)
            except KlingFailure as exc:
                raise error_from_kling(exc) from exc

        if refresh_first:
            record = record.updated_from(await fetch())
            await self._tasks.save(record)
        return await wait_for_task(
            record,
            fetch,
            self._tasks.save,
            wait_s=min(wait_s, principal.tenant.policy.max_wait_seconds or self._max_wait_s, self._max_wait_s),
            first_interval_s=self._first_poll_interval_s,
            on_progress=on_progress,
        )

    async def _kling_of(self, principal: Principal, record: TaskRecord) -> KlingCredentials:
        """The account the task runs on, which is not the tenant's current one if its credentials changed since."""
        if record.credential_id in ("", principal.credential_id):
            return principal.kling
        return await self._credentials(record.credential_id) or principal.kling

    async def _submit(
        self, principal: Principal, request: GenerateRequest, external_task_id: str | None = None
    ) -> TaskRecord:
        external_task_id = external_task_id or external_task_id_for(principal.tenant.id, None)
        body = build_generation_body(request, external_task_id=external_task_id)
        task = await self._create_or_adopt(principal.kling, body, external_task_id)
        record = TaskRecord(
            task_id=task.task_id,
            tenant_id=principal.tenant.id,
            credential_id=principal.credential_id,
            external_task_id=external_task_id,
            model_name=request.model_name,
            num_images=request.num_images,
            status=TaskStatus.SUBMITTED,
            created_at_ms=task.created_at,
            updated_at_ms=task.updated_at,
        ).updated_from(task)
        await self._tasks.save(record)
        await self._usage.record(principal.tenant.id, principal.key_id, tasks=1, images=request.num_images)
        return record

    async def _create_or_adopt(self, kling: KlingCredentials, body: dict[str, Any], external_task_id: str) -> KlingTask:
        try:
            return await self._kling.create_image_task(kling, body)
        except KlingFailure as exc:
            # The create may have reached Kling although its answer was lost (a transport failure), or an
            # earlier attempt whose answer was lost created it (a duplicate external_task_id). Either way,
            # look it up and adopt it: never pay twice, never report a task that exists as failed.
            ambiguous = isinstance(exc, KlingTransportError) or (
                isinstance(exc, KlingError) and exc.code in (1200, 1201) and "external_task_id" in exc.message
            )
            found = await self._find_by_external_id(kling, external_task_id) if ambiguous else None
            if found is None:
                raise error_from_kling(exc) from exc
            return found

    async def _find_by_external_id(self, kling: KlingCredentials, external_task_id: str) -> KlingTask | None:
        try:
            return await self._kling.get_image_task(kling, external_task_id)
        except KlingError as exc:
            if exc.code == _CODE_TASK_NOT_FOUND:
                return None
            raise error_from_kling(exc) from exc
        except KlingFailure:
            return None

    async def _submit_once(self, principal: Principal, request: GenerateRequest, key: str) -> TaskRecord:
        """Exactly one Kling task per (tenant, key): the first caller submits, duplicates get its task."""
        scope = f"{principal.tenant.id}:{hashlib.sha256(key.encode()).hexdigest()}"
        fingerprint = request_fingerprint(request)
        deadline = time.monotonic() + IDEMPOTENCY_WAIT_S
        while True:
            existing = await self._tasks.claim_idempotency(scope, IdempotencyClaim(fingerprint))
            if existing is None:
                return await self._submit_claimed(principal, request, key, scope, fingerprint)
            if existing.fingerprint != fingerprint:
                raise InvalidRequest("idempotency_key", "was already used with different arguments")
            if existing.task_id is not None:
                record = await self._tasks.get(existing.task_id)
                if record is None:
                    raise NotFound("the task of this idempotency key no longer exists")
                return record
            if time.monotonic() >= deadline:
                raise Conflict("a request with this idempotency_key is still being submitted; retry shortly")
            # The first request is talking to Kling right now; its answer is usually a moment away.
            await asyncio.sleep(0.1)

    async def _submit_claimed(
        self, principal: Principal, request: GenerateRequest, key: str, scope: str, fingerprint: str
    ) -> TaskRecord:
        try:
            record = await self._submit(principal, request, external_task_id_for(principal.tenant.id, key))
        except BaseException:
            # Nothing was created (a lost answer was already looked up): a retry may submit again.
            await asyncio.shield(self._tasks.release_idempotency(scope))
            raise
        await self._tasks.complete_idempotency(scope, IdempotencyClaim(fingerprint, record.task_id))
        return record
