"""ImageService: the one use case behind both edges (REST and MCP).

validate (done by `GenerateRequest`) -> apply the tenant's policy -> admit under the tenant's limits ->
wait for free slots on the Kling account -> submit -> record -> follow the task to its end (releasing
its slots then) -> wait up to `wait_seconds`, reporting progress -> return the task and what quota is left.
Neither edge talks to Kling or the store directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import anyio
from redis.exceptions import RedisError

from app.errors import Conflict, InvalidRequest, NotFound, RateLimited, UpstreamUnavailable, error_from_kling
from app.follower import TaskFollower
from app.kling import (
    KlingClient,
    KlingCredentials,
    KlingError,
    KlingFailure,
    KlingProtocolError,
    KlingTask,
    KlingTransportError,
    build_generation_body,
)
from app.lifecycle import Drain
from app.metrics import LEASES_RETAKEN
from app.models import GenerateRequest, TaskStatus, TaskView
from app.observability import Waiting
from app.ratelimit import (
    AccountGovernor,
    Admission,
    Limiter,
    Remaining,
    count_slot_taken,
    limit_refused,
    refuse_impossible,
)
from app.references import ReferenceGuard
from app.sealing import SealingError
from app.tasks import IdempotencyClaim, PollLease, ProgressCallback, TaskRecord, TaskStore
from app.tenants import Tenant, TenantPolicy
from app.usage import UsageStore

logger = logging.getLogger(__name__)
# How long a duplicate request waits for the first one (same idempotency key) to be accepted by Kling.
IDEMPOTENCY_WAIT_S = 10.0
MAX_WATCH_S = 3600.0  # the longest an event stream follows one task
_CODE_TASK_NOT_FOUND = 1203
_CODE_NO_SLOT = 1303
_RETRYABLE_CODES = frozenset({1302, 1303, 5000, 5001, 5002})


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: a tenant, the Kling account its tasks run on (and that account's image
    slots), and the key used (`oauth:<subject>` for OAuth callers)."""

    tenant: Tenant
    credential_id: str
    kling: KlingCredentials
    concurrency: int
    key_id: str


@dataclass(frozen=True)
class Outcome:
    record: TaskRecord
    remaining: Remaining | None = None

    def view(self) -> TaskView:
        view = self.record.view()
        if self.remaining is None:
            return view
        quota = {name: value for name, value in vars(self.remaining).items() if value is not None}
        return view.model_copy(update={"quota": quota})


def apply_policy(policy: TenantPolicy, request: GenerateRequest) -> GenerateRequest:
    """The request as the tenant's policy allows it; raises InvalidRequest naming the argument otherwise."""
    if policy.default_model and "model_name" not in request.model_fields_set:
        # Re-validated: the tenant's model may not accept what the caller asked of the default one.
        fields = request.model_dump(exclude_unset=True) | {"model_name": policy.default_model}
        request = GenerateRequest.model_validate(fields)
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


def refused_a_slot(failure: BaseException) -> bool:
    """Whether a submission failed for want of a Kling account slot in time: a refusal on concurrency, which must
    not cost the tenant its rate (reference/reliability.md §1.3)."""
    return isinstance(failure, RateLimited) and failure.details.get("limit") == "kling_account"


def fresh_external_task_id() -> str:
    return f"kgw-{uuid.uuid4().hex}"


def keyed_external_task_id(tenant_id: str, idempotency_key: str, fingerprint: str) -> str:
    """Derived from (tenant, key, the request's fingerprint), so a retry reaches the same Kling task. The
    fingerprint keeps a key used again with other arguments once its day is over (when the gateway no longer
    remembers it) from reaching, and adopting, the earlier task: Kling keeps external ids for good."""
    return "kgw-" + hashlib.sha256(f"{tenant_id}\0{idempotency_key}\0{fingerprint}".encode()).hexdigest()[:32]


def retry_delay(failure: KlingFailure, attempt: int, *, known_absent: bool = False) -> float | None:
    """Seconds to wait before trying a create again, or None when retrying cannot help.

    Retried: 1302/1303 (busy), 5000-5002 (Kling's side), connections that never reached Kling, and
    connections dropped without an answer when a look-up found no task (`known_absent`): typically a kept-alive
    connection the server had just closed. Never after a timeout (the create may still be under way at Kling),
    nor for account, billing, permission, parameter or content-policy codes. Full jitter (AWS), at least 1 s
    for a 1303, and at least what Kling's Retry-After says.
    """
    if isinstance(failure, KlingTransportError):
        safe = not failure.sent or (known_absent and not failure.timed_out)
        return random.uniform(0, min(4.0, 0.25 * 2**attempt)) if safe else None
    if not isinstance(failure, KlingError) or failure.code not in _RETRYABLE_CODES:
        return None
    floor = 1.0 if failure.code == _CODE_NO_SLOT else 0.0
    jittered = max(floor, random.uniform(0, min(8.0, 0.5 * 2**attempt)))
    return max(jittered, failure.retry_after or 0.0)


def _create_failed(failure: KlingFailure) -> Exception:
    if isinstance(failure, KlingError) and failure.code == _CODE_NO_SLOT:
        # Another client of the account holds its slots: to the caller that is a busy account, not a failure.
        return limit_refused("kling_account", 2000, "Kling answered 1303 (no free slot) until the deadline")
    return error_from_kling(failure)


def _maybe_created(failure: KlingFailure) -> bool:
    """Whether a failed create may nonetheless have created the task (reference/kling-api.md §6, §8)."""
    if isinstance(failure, KlingTransportError):
        return failure.sent
    if isinstance(failure, KlingProtocolError):
        return True
    if not isinstance(failure, KlingError):
        return False  # e.g. an open circuit: nothing was sent
    duplicate = failure.code in (1200, 1201) and "external_task_id" in failure.message
    return duplicate or failure.code in (5000, 5001, 5002) or failure.http_status >= 500


class UncertainCreate(Exception):
    """A create may have reached Kling, and Kling could not be asked whether it did."""

    def __init__(self, failure: KlingFailure) -> None:
        super().__init__(str(failure))
        self.error = error_from_kling(failure)


@dataclass(frozen=True)
class ServiceTimings:
    max_wait_s: int
    queue_timeout_s: float  # longest wait for free slots on a Kling account
    claim_ttl_s: float  # how long an unfinished idempotency claim blocks its key


class ImageService:
    def __init__(
        self,
        kling: KlingClient,
        tasks: TaskStore,
        usage: UsageStore,
        credentials: Callable[[str], Awaitable[KlingCredentials | None]],
        limiter: Limiter,
        governor: AccountGovernor,
        follower: TaskFollower,
        timings: ServiceTimings,
        drain: Drain,
        references: ReferenceGuard,
        callback_url_for: Callable[[str], str | None],
        *,
        limits_in_redis: bool = False,
    ) -> None:
        self._kling = kling
        self._tasks = tasks
        self._usage = usage
        self._credentials = credentials
        self._limiter = limiter
        self._governor = governor
        self._follower = follower
        self._timings = timings
        self._drain = drain
        self._references = references
        self._callback_url_for = callback_url_for
        # With the limits in Redis, the limiter's and the governor's scripts for one submission are sent at once, to
        # share a round trip. In memory both answer without waiting: at once would only add tasks to the event loop.
        self._together = limits_in_redis

    async def generate(
        self,
        principal: Principal,
        request: GenerateRequest,
        *,
        wait_s: int,
        on_progress: ProgressCallback | None = None,
    ) -> Outcome:
        """Start (or, for a repeated idempotency key, find) the task, then wait for it up to `wait_s`."""
        if self._drain.draining:
            raise UpstreamUnavailable("this gateway replica is shutting down; retry (another replica will answer)",
                                      retry_after=1)  # fmt: skip
        request = apply_policy(principal.tenant.policy, request)
        await self._references.check(request.ref_image_url)
        if request.webhook_url is not None:
            await self._check_webhook(principal, request.webhook_url)
        if request.idempotency_key is None:
            outcome = await self._submit(principal, request)
        else:
            outcome = await self._submit_once(principal, request, request.idempotency_key)
        wait_s = self._wait_cap(principal, wait_s)
        if on_progress is not None and wait_s > 0 and not outcome.record.status.is_terminal:
            # Only when a wait follows: a notification turns an MCP answer into an SSE stream, which an
            # immediate answer does not need (the MCP SDK then answers with plain JSON, at less cost).
            await on_progress(outcome.record, 0.0)
        return replace(outcome, record=await self._wait(principal, outcome.record, wait_s, on_progress))

    async def _check_webhook(self, principal: Principal, url: str) -> None:
        if principal.tenant.sealed_webhook_secret is None:
            raise InvalidRequest(
                "webhook_url",
                "needs a webhook secret for your tenant to sign with; an administrator creates one with "
                "POST /admin/tenants/{tenant_id}/webhook-secret",
            )
        await self._references.check_webhook(url)

    async def status(
        self, principal: Principal, task_id: str, *, wait_s: int = 0, on_progress: ProgressCallback | None = None
    ) -> Outcome:
        """A task of the caller's own tenant; another tenant's task is reported as not found."""
        remaining = await self._limiter.admit_request(principal.tenant.id, principal.key_id, principal.tenant.limits)
        await self._record_usage(principal, requests=1)
        record = await self._tasks.get(task_id)
        if record is None or record.tenant_id != principal.tenant.id:
            raise NotFound(f"no task {task_id!r} for this API key")
        wait_s = self._wait_cap(principal, wait_s)
        if wait_s <= 0 and not record.status.is_terminal and not await self._kept_current(task_id):
            record = await self._follower.refresh(record, await self._kling_of(principal, record))
        return Outcome(await self._wait(principal, record, wait_s, on_progress), remaining)

    async def updates(
        self, principal: Principal, record: TaskRecord, *, heartbeat_s: float
    ) -> AsyncIterator[TaskRecord]:
        """The task each time it changes, and at least every `heartbeat_s` (the same record, as a heartbeat),
        until it ends or MAX_WATCH_S passes. The caller has been admitted and authorized already."""
        deadline = time.monotonic() + MAX_WATCH_S
        while not record.status.is_terminal and time.monotonic() < deadline and not self._drain.draining:
            # Rounds of the stream, not a caller's wait: not capped by the wait limits (a cap of 0 would spin).
            record = await self._wait(principal, record, max(1, round(heartbeat_s)), None)
            yield record

    # --- waiting ---

    def _wait_cap(self, principal: Principal, wait_s: int) -> int:
        """A caller's `wait_s` within the gateway's and the tenant's limits (0 means answer at once)."""
        policy_max = principal.tenant.policy.max_wait_seconds
        limit = self._timings.max_wait_s if policy_max is None else min(policy_max, self._timings.max_wait_s)
        return max(0, min(wait_s, limit))

    async def _wait(
        self, principal: Principal, record: TaskRecord, wait_s: int, on_progress: ProgressCallback | None
    ) -> TaskRecord:
        """Wait for the task's end, up to `wait_s` (capped by the caller already); never fails once the task
        exists. Answers at once with the task as it stands when draining starts."""
        if wait_s <= 0 or record.status.is_terminal:
            return record  # nothing to wait for: no waiter counted, no drain watch
        latest = record
        with self._drain.ended_on_start():
            try:
                # However many callers wait, here or on other replicas, the task costs one stream of queries.
                kling = await self._kling_of(principal, record)
                with Waiting():
                    latest = await self._follower.wait(record, kling, wait_s, on_progress)
            except (RedisError, OSError, SealingError):
                # The task exists: the caller gets its id rather than an error that invites paying again.
                logger.warning("waiting on task %s failed; answering with its last known state", record.task_id)
        if self._drain.draining and not latest.status.is_terminal:
            latest = self._follower.latest(record.task_id) or latest
        return latest

    async def _kept_current(self, task_id: str) -> bool:
        """Whether a replica polls the task now, so its record is at most one poll interval old."""
        if self._follower.following(task_id):
            return True
        try:
            return await self._tasks.is_polled(task_id)
        except RedisError:
            return False

    async def _save_quietly(self, record: TaskRecord, *, polled_by: PollLease | None = None) -> None:
        try:
            await self._tasks.save(record, polled_by=polled_by)
        except RedisError:
            logger.warning("could not record the state of task %s", record.task_id)

    async def _kling_of(self, principal: Principal, record: TaskRecord) -> KlingCredentials:
        """The account the task runs on, which is not the tenant's current one if its credentials changed since."""
        if record.credential_id in ("", principal.credential_id):
            return principal.kling
        return await self._credentials(record.credential_id) or principal.kling

    # --- submitting ---

    async def _submit(
        self, principal: Principal, request: GenerateRequest, external_task_id: str | None = None
    ) -> Outcome:
        """Admit, take slots, create at Kling, record, follow.

        Until the create may have reached Kling, a failure or a hang-up returns the slots at once. From then
        on the work is shielded from cancellation (a hung-up caller must not leave a running task unrecorded),
        and if it ends without knowing whether Kling created the task, the slots are kept until their leases
        lapse: a task that may run at Kling must not free its slots early.
        """
        tenant, images = principal.tenant, request.num_images
        # Before admission, so that a request no account slot can ever hold costs no rate; not before an
        # idempotency key's replay, which returns its task even if the account has fewer slots since.
        refuse_impossible(images, principal.concurrency)
        admission, account_lease = await self._admit_with_slot(principal, images)
        # Only a key-derived id can have been sent before (a retry of the same key): a fresh one needs no marker.
        create = self._create_once if external_task_id is not None else self._create
        external_task_id = external_task_id or fresh_external_task_id()
        with anyio.CancelScope(shield=True):
            try:
                callback_url = self._callback_url_for(external_task_id)
                body = build_generation_body(request, external_task_id=external_task_id, callback_url=callback_url)
                task = await create(principal.kling, body, external_task_id)
            except UncertainCreate as exc:
                logger.warning("task %s may exist at Kling; its slots lapse by themselves", external_task_id)
                await self._record_usage(principal, requests=1)
                raise exc.error from exc
            except BaseException as exc:
                # A refused slot here: Kling answered 1303 until the deadline, its account as full as our queue says.
                await self._undo(principal, admission.lease_id, account_lease, images, rate_back=refused_a_slot(exc))
                raise
            record = TaskRecord(
                task_id=task.task_id, tenant_id=tenant.id, credential_id=principal.credential_id,
                external_task_id=external_task_id, model_name=request.model_name, num_images=images,
                status=TaskStatus.SUBMITTED, created_at_ms=task.created_at, updated_at_ms=task.updated_at,
                webhook_url=request.webhook_url,
            ).updated_from(task)  # fmt: skip
            leases = _TaskLeases(self, principal, admission.lease_id, account_lease, images)
            self._follower.follow(record, principal.kling, leases)
            # The request is counted with its task, once rather than on admission and here; with Redis, in the
            # process, written later in a batch (app/usage_buffer.py), so the record is the one round trip here
            # (with KGW_USAGE_FLUSH_SECONDS=0, usage is one more before it: the operator chose exact counts).
            # The record marks the task followed and takes its poll lease too (the follow just started relies on
            # both: it polls first without claiming, and should this replica stop, the mark goes stale and another
            # adopts the task). Both log Redis failures, not raise.
            await self._record_usage(principal, requests=1, tasks=1, images=images)
            await self._save_quietly(record, polled_by=self._follower.poll_lease)
        return Outcome(record, admission.remaining)

    async def _admit_with_slot(self, principal: Principal, images: int) -> tuple[Admission, str]:
        """The tenant's admission, then a slot of its Kling account. With the limits in Redis, the admission and a
        try for a free slot go at once, so that their scripts share one round trip (app/script_batches.py); the try
        never queues, so a submission the limiter refuses holds no place in the queue, and gives back at once a
        slot it took. An admitted one whose try found the account full then queues for its slot."""
        tenant = principal.tenant
        trying: asyncio.Future[str | None] | None = None
        if self._together:
            trying = asyncio.ensure_future(
                self._governor.try_acquire(principal.credential_id, images, principal.concurrency)
            )
        try:
            admission = await self._limiter.admit_task(tenant.id, principal.key_id, tenant.limits, images)
        except BaseException:
            if trying is not None:
                await asyncio.shield(self._give_back_slot(principal, trying))
            raise
        try:
            taken = await trying if trying is not None else None
            if taken is not None:
                count_slot_taken()
                return admission, taken
            return admission, await self._take_slot(principal, images)
        except BaseException as exc:
            # One shielded await: anyio cancels again at each await, and the work must all go on regardless.
            await asyncio.shield(
                self._undo_unslotted(principal, admission, trying, images, rate_back=refused_a_slot(exc))
            )
            raise

    async def _undo_unslotted(
        self,
        principal: Principal,
        admission: Admission,
        trying: asyncio.Future[str | None] | None,
        images: int,
        *,
        rate_back: bool,
    ) -> None:
        """An admitted submission that got no slot: a slot its try took (its answer cut off by a cancellation)
        goes back, then the admission (as `_undo`)."""
        if trying is not None:
            await self._give_back_slot(principal, trying)
        await self._undo(principal, admission.lease_id, None, images, rate_back=rate_back)

    async def _take_slot(self, principal: Principal, images: int) -> str:
        wait_s = self._timings.queue_timeout_s
        return await self._governor.acquire(principal.credential_id, images, principal.concurrency, wait_s)

    async def _give_back_slot(self, principal: Principal, trying: asyncio.Future[str | None]) -> None:
        """The slot a refused submission's try took, if it took one (a try that failed took none that will not
        lapse)."""
        try:
            lease = await trying
        except (asyncio.CancelledError, Exception):
            return
        if lease is not None:
            await self._release_account_slot(principal, lease)

    async def _record_usage(self, principal: Principal, *, requests: int = 0, tasks: int = 0, images: int = 0) -> None:
        """Usage is bookkeeping: failing to count must never fail a request (least of all a paid one)."""
        try:
            await self._usage.record(principal.tenant.id, principal.key_id, requests=requests, tasks=tasks,
                                     images=images)  # fmt: skip
        except (RedisError, OSError):
            logger.warning("could not record usage of tenant %s", principal.tenant.id)

    async def _refresh(self, principal: Principal, tenant_lease: str, account_lease: str, images: int) -> None:
        """Extend a running task's leases; one found lapsed is taken again (and reported), for the task still
        holds its place at Kling: left lapsed, its slots would be given to others and the limits exceeded."""
        try:
            held = {
                "tenant": await self._limiter.refresh(principal.tenant.id, tenant_lease, retake=1),
                "kling_account": await self._governor.refresh(principal.credential_id, account_lease, retake=images),
            }
        except (RedisError, OSError):
            # Redis is away: the leases may lapse and free their slots early; Kling's 1303 is the backstop.
            logger.warning("could not refresh the leases of tenant %s", principal.tenant.id)
            return
        for kind in [kind for kind, kept in held.items() if not kept]:
            LEASES_RETAKEN.labels(kind).inc()
            logger.warning("a %s lease of a running task of tenant %s had lapsed; taken again", kind,
                           principal.tenant.id)  # fmt: skip

    async def _undo(
        self, principal: Principal, tenant_lease: str, account_lease: str | None, refund: int, *, rate_back: bool
    ) -> None:
        """An admitted submission that created nothing: its slots back; the request still counts as one. With
        `rate_back` (refused for want of an account slot), its rate charge too: a refusal on concurrency costs none."""
        await self._release(principal, tenant_lease, account_lease, refund)
        await self._record_usage(principal, requests=1)
        if not rate_back:
            return
        try:
            await self._limiter.refund_rate(principal.tenant.id, principal.key_id, principal.tenant.limits,
                                            tenant_lease)  # fmt: skip
        except (RedisError, OSError):
            logger.warning("could not give back the rate of tenant %s after a refusal", principal.tenant.id)

    async def _release(self, principal: Principal, tenant_lease: str, account_lease: str | None, refund: int) -> None:
        """The account's slot, then the tenant's lease (with Redis, in one round trip), each on its own: one failing
        must not keep the other slot."""
        if account_lease is None:
            await self._release_tenant_lease(principal, tenant_lease, refund)
        elif self._together:
            await asyncio.gather(self._release_account_slot(principal, account_lease),
                                 self._release_tenant_lease(principal, tenant_lease, refund))  # fmt: skip
        else:
            await self._release_account_slot(principal, account_lease)
            await self._release_tenant_lease(principal, tenant_lease, refund)

    async def _release_tenant_lease(self, principal: Principal, lease: str, refund: int) -> None:
        try:
            await self._limiter.release(principal.tenant.id, lease, refund_images=refund)
        except (RedisError, OSError):
            logger.warning("could not release a lease of tenant %s; it lapses", principal.tenant.id)

    async def _release_account_slot(self, principal: Principal, lease: str) -> None:
        try:
            await self._governor.release(principal.credential_id, lease)
        except (RedisError, OSError):
            logger.warning("could not release an account slot of tenant %s; it lapses", principal.tenant.id)

    async def _create_once(self, kling: KlingCredentials, body: dict[str, Any], external_task_id: str) -> KlingTask:
        """The id is recorded before the create is sent: if an earlier attempt with it (say, on a replica that
        crashed before hearing back) may have created the task, look it up instead of paying again."""
        try:
            earlier = await self._tasks.mark_submitting(external_task_id)
        except (RedisError, OSError):
            earlier = False  # the marker is a safeguard on top of Kling's own external_task_id uniqueness
        if earlier and (found := await self._find_by_external_id(kling, external_task_id)):
            task = found
        else:
            task = await self._create(kling, body, external_task_id)
        try:
            await self._tasks.confirm_submitted(external_task_id)
        except (RedisError, OSError):
            logger.warning("could not clear the submission marker of %s", external_task_id)
        return task

    async def _create(self, kling: KlingCredentials, body: dict[str, Any], external_task_id: str) -> KlingTask:
        """Create the task, retrying only what Kling says is worth retrying, always with the same
        `external_task_id`, within the submission's deadline (reference/kling-api.md §6).

        Raises:
            GatewayError: Kling certainly did not create the task.
            UncertainCreate: the create may have gone through and looking it up failed too.
        """
        deadline = time.monotonic() + self._timings.queue_timeout_s
        for attempt in itertools.count():
            try:
                return await self._kling.create_image_task(kling, body)
            except KlingFailure as exc:
                failure = exc
            # The create may have reached Kling although the answer says otherwise or was lost: look it up
            # by the id we chose and adopt it. Never pay twice, never report a task that exists as failed.
            absent = False
            if _maybe_created(failure):
                found = await self._find_by_external_id(kling, external_task_id)
                if found is not None:
                    return found
                absent = True
            delay = retry_delay(failure, attempt, known_absent=absent)
            if delay is None or time.monotonic() + delay >= deadline:
                raise _create_failed(failure) from failure
            with Waiting(waiter=False):
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _find_by_external_id(self, kling: KlingCredentials, external_task_id: str) -> KlingTask | None:
        """The task, or None when Kling says there is none; UncertainCreate when Kling cannot tell us."""
        try:
            return await self._kling.get_image_task(kling, external_task_id)
        except KlingError as exc:
            if exc.code == _CODE_TASK_NOT_FOUND:
                return None
            raise UncertainCreate(exc) from exc
        except KlingFailure as exc:
            raise UncertainCreate(exc) from exc

    # --- idempotency ---

    async def _submit_once(self, principal: Principal, request: GenerateRequest, key: str) -> Outcome:
        """Exactly one Kling task per (tenant, key): the first caller submits, duplicates get its task."""
        scope = f"{principal.tenant.id}:{hashlib.sha256(key.encode()).hexdigest()}"
        mine = IdempotencyClaim(request_fingerprint(request), owner=uuid.uuid4().hex)
        deadline = time.monotonic() + IDEMPOTENCY_WAIT_S
        while True:
            existing = await self._tasks.claim_idempotency(scope, mine, self._timings.claim_ttl_s)
            # Our own claim comes back when a timed-out SET was applied and then retried by the client.
            if existing is None or existing.owner == mine.owner:
                return await self._submit_claimed(principal, request, key, scope, mine)
            if existing.fingerprint != mine.fingerprint:
                raise InvalidRequest("idempotency_key", "was already used with different arguments")
            if existing.task_id is not None:
                return await self._replay(principal, existing.task_id)
            if time.monotonic() >= deadline:
                raise Conflict("a request with this idempotency_key is still being submitted; retry shortly")
            # The first request is talking to Kling right now; its answer is usually a moment away.
            with Waiting(waiter=False):
                await asyncio.sleep(0.1)

    async def _replay(self, principal: Principal, task_id: str) -> Outcome:
        remaining = await self._limiter.admit_request(principal.tenant.id, principal.key_id, principal.tenant.limits)
        await self._record_usage(principal, requests=1)
        record = await self._tasks.get(task_id)
        if record is None:
            raise NotFound("the task of this idempotency key no longer exists")
        return Outcome(record, remaining)

    async def _submit_claimed(
        self, principal: Principal, request: GenerateRequest, key: str, scope: str, claim: IdempotencyClaim
    ) -> Outcome:
        try:
            external_task_id = keyed_external_task_id(principal.tenant.id, key, claim.fingerprint)
            outcome = await self._submit(principal, request, external_task_id)
        except BaseException:
            # Nothing was created (a possibly created task was looked up already): a retry may submit again.
            await asyncio.shield(self._tasks.release_idempotency(scope, claim.owner))
            raise
        try:
            # Shielded: a hang-up during the (shielded) create is delivered at this, the first await after it, and
            # an unfinished claim would make every retry of the key wait and then be refused until it lapsed.
            await asyncio.shield(
                self._tasks.complete_idempotency(scope, replace(claim, task_id=outcome.record.task_id))
            )
        except RedisError:
            # The claim then lapses after its short TTL; a retry adopts the task through its external id.
            logger.warning("could not record the task of an idempotency key of tenant %s", principal.tenant.id)
        return outcome


class _TaskLeases:
    """A submitted task's tenant lease and account slot, as the follower holds them (`Leases`) for the task's
    whole life: one small object, where two closures over the same four values took seven."""

    __slots__ = ("_account_lease", "_images", "_principal", "_service", "_tenant_lease")

    def __init__(
        self, service: ImageService, principal: Principal, tenant_lease: str, account_lease: str, images: int
    ) -> None:
        self._service = service
        self._principal = principal
        self._tenant_lease = tenant_lease
        self._account_lease = account_lease
        self._images = images

    async def refresh(self) -> None:
        await self._service._refresh(self._principal, self._tenant_lease, self._account_lease, self._images)

    async def release(self) -> None:
        await self._service._release(self._principal, self._tenant_lease, self._account_lease, 0)
