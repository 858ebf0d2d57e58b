"""REST routes for tenants' callers: `POST /generate`, `GET /tasks/{task_id}`, and the error handlers
that give every REST failure the same JSON shape: `{"error": {"type", "message", ...}}`."""

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import Authenticator, principal_dependency
from app.errors import (
    KNOWN_ERRORS,
    GatewayError,
    InvalidRequest,
    error_response,
    gateway_error_from,
    invalid_request_from,
)
from app.images import ImageService, Principal
from app.models import GenerateRequest, IdempotencyKey, TaskView
from app.usage import DailyUsage, UsageStore

logger = logging.getLogger(__name__)

SSE_HEARTBEAT_S = 5.0
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": description}
    for status, description in {
        401: "Missing, malformed, unknown or revoked API key",
        404: "No such task for this API key",
        409: "The same idempotency key is still being submitted",
        422: "Invalid argument (the error names the field)",
        429: "Kling account busy (see Retry-After)",
        502: "Kling failed or answered unexpectedly",
        503: "Kling or the gateway's store is unavailable (see Retry-After)",
        504: "Kling did not answer in time",
    }.items()
}


_IDEMPOTENCY_KEY = TypeAdapter(IdempotencyKey)


def header_idempotency_key(value: str) -> str:
    try:
        key = _IDEMPOTENCY_KEY.validate_python(value)
    except ValidationError as exc:
        raise InvalidRequest("Idempotency-Key", "must be 1 to 255 printable ASCII characters, no spaces") from exc
    assert key is not None
    return key


def build_api_router(service: ImageService, authenticator: Authenticator, usage: UsageStore) -> APIRouter:
    router = APIRouter(tags=["images"], responses=ERROR_RESPONSES)
    caller = Annotated[Principal, Depends(principal_dependency(authenticator))]

    @router.post(
        "/generate",
        status_code=202,
        response_model=TaskView,
        responses={200: {"model": TaskView, "description": "The task finished within wait_seconds"}},
    )
    async def generate(
        body: GenerateRequest,
        principal: caller,
        response: Response,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> TaskView:
        """Start generating images. Answers 202 with the task, or 200 with the images when the task
        finished within `wait_seconds` (default 0). Send an `Idempotency-Key` to retry without paying twice."""
        if idempotency_key is not None and idempotency_key != body.idempotency_key:
            if body.idempotency_key is not None:
                raise InvalidRequest("Idempotency-Key", "differs from the idempotency_key in the body")
            # Only the header is checked: the body was validated already (a 10 MB inline image, say).
            body = body.model_copy(update={"idempotency_key": header_idempotency_key(idempotency_key)})
        outcome = await service.generate(principal, body, wait_s=body.wait_seconds or 0)
        response.status_code = 200 if outcome.record.status.is_terminal else 202
        return outcome.view()

    @router.get("/tasks/{task_id}", response_model=TaskView)
    async def get_task(
        task_id: str,
        principal: caller,
        wait_seconds: Annotated[int, Query(ge=0, le=3600, description="Wait up to this long for the end")] = 0,
    ) -> TaskView:
        """Status and images of one of the caller's own tasks."""
        outcome = await service.status(principal, task_id, wait_s=wait_seconds)
        return outcome.view()

    @router.get(
        "/tasks/{task_id}/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "`status` events, then the end"}},
    )
    async def task_events(task_id: str, principal: caller) -> StreamingResponse:
        """Server-sent events: a `status` event with the task (as `GET /tasks/{task_id}` returns it) now and
        on every change, a comment line at least every 5 s to keep proxies from closing the stream, and the
        stream ends once the task has finished."""
        outcome = await service.status(principal, task_id)  # authorizes and charges once, before streaming

        async def events() -> AsyncIterator[str]:
            last, sent_at = outcome.record, time.monotonic()
            yield sse_event(last.view())
            # Checked every second, so a change is sent within a second of the gateway learning of it.
            async for record in service.updates(principal, last, heartbeat_s=1.0):
                if record != last:
                    yield sse_event(record.view())
                elif time.monotonic() - sent_at >= SSE_HEARTBEAT_S:
                    yield ": heartbeat\n\n"
                else:
                    continue
                last, sent_at = record, time.monotonic()

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @router.get("/usage", response_model=list[DailyUsage])
    async def get_usage(
        principal: caller, days: Annotated[int, Query(ge=1, le=400, description="How many UTC days")] = 30
    ) -> list[DailyUsage]:
        """The caller's tenant: requests, tasks and images per UTC day (and per key), newest first."""
        return await usage.tenant_usage(principal.tenant.id, days)

    return router


def sse_event(view: TaskView) -> str:
    return f"event: status\ndata: {view.model_dump_json()}\n\n"


def install_error_handlers(app: FastAPI) -> None:
    async def on_known_error(_: Request, exc: Exception) -> JSONResponse:
        error = gateway_error_from(exc)
        if error is None:
            raise exc
        if error.status >= 500:
            logger.warning("request failed: %s (%s)", error.type, type(exc).__name__)
        return error_response(error)

    async def on_request_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(invalid_request_from(exc.errors()))

    async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error = GatewayError(str(exc.detail), "not_found" if exc.status_code == 404 else "http_error", exc.status_code)
        return JSONResponse(error.to_json(), status_code=exc.status_code, headers=exc.headers)

    for exc_class in KNOWN_ERRORS:
        app.add_exception_handler(exc_class, on_known_error)
    app.add_exception_handler(RequestValidationError, on_request_validation)
    app.add_exception_handler(StarletteHTTPException, on_http_error)


class _Replay:
    """The app's `receive`: the body read already, then the caller's hang-up when it comes. An object rather than
    a closure: every waiting caller holds one."""

    __slots__ = ("_body", "_hang_up")

    def __init__(self, body: list[Message], hang_up: asyncio.Future[Message]) -> None:
        self._body = body
        self._hang_up = hang_up

    async def __call__(self) -> Message:
        return self._body.pop(0) if self._body else await asyncio.shield(self._hang_up)


def _cancel_if_hung_up(request_scope: anyio.CancelScope, message: asyncio.Future[Message]) -> None:
    if not message.cancelled() and message.exception() is None and message.result()["type"] == "http.disconnect":
        request_scope.cancel()


class RestRequestGuard:
    """Pure ASGI, in front of the REST routes (the MCP transports, which have their own body limits and
    cancellation, are dispatched before it, by `McpTransports`):

    - a body over `max_body_bytes` is refused with a JSON 413 before anything parses it;
    - when the caller hangs up, its request is cancelled, as the MCP transport does for tools. Otherwise a
      request waiting for free Kling slots would go on after its caller gave up and could create (and bill)
      a task nobody will ever see; cancelling releases its leases and queue place at once.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self._app = app
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        with anyio.CancelScope() as request_scope:
            # After the body, the caller's next message can only be its hang-up: it is read at once, by a plain task
            # (stopped with one cheap cancel when the answer is sent, where a task group's cancel scope would format
            # the task's repr), and the app's own reads past the body wait for the same message. No watching
            # coroutine or event of its own: a caller waiting for its images keeps fewer objects alive.
            hang_up = asyncio.ensure_future(receive())
            hang_up.add_done_callback(functools.partial(_cancel_if_hung_up, request_scope))
            try:
                await self._app(scope, _Replay(body, hang_up), send)
            finally:
                hang_up.cancel()

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> list[Message] | None:
        """The request's body messages, or None when the request is answered (413) or gone."""
        declared = dict(scope["headers"]).get(b"content-length", b"")
        body: list[Message] = []
        received = int(declared) if declared.isdigit() else 0
        while received <= self._max_body_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body.append(message)
            if not declared.isdigit():  # chunked: count what arrives
                received += len(message.get("body", b""))
            if not message.get("more_body", False) and received <= self._max_body_bytes:
                return body
        too_large = GatewayError(
            f"the request body is larger than {self._max_body_bytes} bytes", "payload_too_large", 413
        )
        await error_response(too_large)(scope, receive, send)
        return None
