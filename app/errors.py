"""The gateway's error tree, and how each error reaches a REST caller and an MCP client.

    GatewayError                  type                status
    ├── InvalidRequest            invalid_request     422  (names the field)
    ├── Unauthorized              unauthorized        401  (+ WWW-Authenticate)
    ├── Forbidden                 forbidden           403
    ├── NotFound                  not_found           404
    ├── Conflict                  conflict            409
    ├── RateLimited               rate_limited        429  (+ Retry-After)
    ├── UpstreamRefused           kling_*             403/422/429 (Kling said no; retrying will not help)
    ├── UpstreamUnavailable       upstream_unavailable 502/503 (+ Retry-After)
    ├── UpstreamTimeout           upstream_timeout    504
    └── StoreUnavailable          store_unavailable   503  (+ Retry-After)

Adapters raise their own errors (`KlingError`, redis errors); the edges translate them once, here.
A message never contains a key, a Kling secret or a JWT.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mcp.types import CallToolResult, TextContent
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.responses import JSONResponse

from app.kling import KlingCircuitOpen, KlingError, KlingProtocolError, KlingTransportError
from app.models import FieldProblem
from app.sealing import SealingError

logger = logging.getLogger(__name__)


@dataclass
class GatewayError(Exception):
    """An error a caller can act on. `details` are extra JSON fields (never secrets)."""

    message: str
    type: str = "internal_error"
    status: int = 500
    retry_after: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # extra HTTP headers, e.g. WWW-Authenticate

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "message": self.message, **self.details}
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return {"error": body}

    def http_headers(self) -> dict[str, str]:
        retry = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        return retry | self.headers


class InvalidRequest(GatewayError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}", "invalid_request", 422, details={"field": field_name})


class Unauthorized(GatewayError):
    def __init__(self, message: str = "a valid API key is required", challenge: str | None = None) -> None:
        challenge = challenge or f'Bearer error="invalid_token", error_description="{_quoted(message)}"'
        super().__init__(message, "unauthorized", 401, headers={"WWW-Authenticate": challenge})


class Forbidden(GatewayError):
    def __init__(self, message: str, challenge: str | None = None) -> None:
        super().__init__(message, "forbidden", 403, headers={"WWW-Authenticate": challenge} if challenge else {})


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


class NotFound(GatewayError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "not_found", 404)


class Conflict(GatewayError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "conflict", 409)


class RateLimited(GatewayError):
    def __init__(self, message: str, retry_after: int, **details: Any) -> None:
        super().__init__(message, "rate_limited", 429, retry_after, details)


class UpstreamRefused(GatewayError):
    """Kling refused the request for a reason retrying will not fix."""


class UpstreamUnavailable(GatewayError):
    def __init__(self, message: str, status: int = 503, retry_after: int | None = 5, **details: Any) -> None:
        super().__init__(message, "upstream_unavailable", status, retry_after, details)


class UpstreamTimeout(GatewayError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "upstream_timeout", 504)


class LimitsUnavailable(GatewayError):
    """Limits cannot be checked (Redis is down) and the policy is to refuse rather than let everything through."""

    def __init__(self) -> None:
        super().__init__(
            "limits cannot be checked right now, so nothing is submitted; retry shortly", "limits_unavailable", 503, 5
        )


class CredentialsUnavailable(GatewayError):
    def __init__(self) -> None:
        super().__init__(
            "the tenant's Kling credentials cannot be opened (master key mismatch); an administrator must fix it",
            "credentials_unavailable",
            503,
            30,
        )


class StoreUnavailable(GatewayError):
    def __init__(self) -> None:
        super().__init__("the gateway's state store is unavailable; retry shortly", "store_unavailable", 503, 2)


_CREDENTIALS_REJECTED = (502, "kling_auth_failed", "Kling rejected this tenant's Kling credentials; an administrator "
                         "must fix them")  # fmt: skip
# What each Kling code means for the caller: (status, type, advice). See reference/kling-api.md §6.
_KLING_CODES: dict[range, tuple[int, str, str]] = {
    range(1000, 1003): _CREDENTIALS_REJECTED,
    # Not the credentials: the token's `nbf` (the gateway's time less 5 s) is still to come by Kling's clock.
    range(1003, 1004): (
        502,
        "kling_auth_failed",
        "Kling says the gateway's token is not valid yet: the gateway host's clock is ahead of Kling's; an "
        "administrator must set it right (NTP)",
    ),
    range(1004, 1005): _CREDENTIALS_REJECTED,
    range(1100, 1103): (
        403,
        "kling_account_unavailable",
        "the tenant's Kling account cannot run tasks (account exception, arrears, or resource pack "
        "depleted or expired); an administrator must top it up, retrying will not help",
    ),
    range(1103, 1104): (
        403,
        "kling_forbidden",
        "the tenant's Kling account has no access to this API or model",
    ),
    range(1200, 1204): (422, "kling_invalid_request", "Kling refused the request parameters"),
    range(1300, 1302): (
        422,
        "content_policy",
        "Kling's content policy refused the request; change the prompt or reference image",
    ),
    range(1302, 1304): (
        429,
        "kling_busy",
        "the Kling account is at its rate or concurrency limit; retry shortly",
    ),
    range(1304, 1305): (403, "kling_ip_not_allowed", "Kling refused the gateway's IP address (IP whitelist)"),
    range(5000, 5003): (503, "kling_unavailable", "Kling is temporarily unavailable; retry shortly"),
}


def error_from_kling(exc: Exception) -> GatewayError:
    """Translate an exception of `app.kling` into what the caller should see."""
    if isinstance(exc, KlingTransportError):
        if exc.timed_out:
            return UpstreamTimeout("Kling did not answer in time; the task may still have been created")
        return UpstreamUnavailable("could not reach Kling; retry shortly", status=502)
    if isinstance(exc, KlingCircuitOpen):
        message = f"the tenant's Kling account failed repeatedly; calls resume in {exc.retry_after_s:.0f} s"
        return UpstreamUnavailable(message, retry_after=max(1, round(exc.retry_after_s)), circuit="open")
    if isinstance(exc, KlingProtocolError):
        return UpstreamUnavailable(f"Kling sent an unexpected answer ({exc})", status=502)
    if not isinstance(exc, KlingError):
        raise TypeError(f"not a Kling error: {exc!r}") from exc
    details = {"kling_code": exc.code, "kling_request_id": exc.request_id}
    for codes, (status, kind, advice) in _KLING_CODES.items():
        if exc.code in codes:
            retry_after = 2 if status in (429, 503) else None
            return UpstreamRefused(
                f"{advice} (Kling code {exc.code}: {exc.message})", kind, status, retry_after, details
            )
    return UpstreamUnavailable(
        f"Kling failed (HTTP {exc.http_status}, code {exc.code}: {exc.message})", 502, None, **details
    )


def tool_error_result(error: GatewayError) -> CallToolResult:
    """An MCP tool result with `isError: true` that a model can read and act on."""
    text = error.message
    if error.retry_after is not None:
        text += f" Retry after {error.retry_after} s."
    payload = error.to_json()
    return CallToolResult(
        is_error=True,
        content=[TextContent(text=text), TextContent(text=json.dumps(payload))],
        structured_content=payload,
    )


def invalid_request_from(errors: Sequence[Mapping[str, Any]]) -> InvalidRequest:
    """The first problem of a pydantic (or FastAPI) validation error, naming the argument to fix."""
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldProblem):
        return InvalidRequest(cause.field, str(cause).removeprefix(cause.field).strip())
    field_name = ".".join(location) or "body"
    message = str(first.get("msg", "is invalid")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = "is not a known argument"
    return InvalidRequest(field_name, message)


# Every exception an edge turns into a caller-facing error (anything else is a bug, and a 500).
KNOWN_ERRORS: tuple[type[Exception], ...] = (GatewayError, ValidationError, RedisError, SealingError)


def gateway_error_from(exc: Exception) -> GatewayError | None:
    """The caller-facing error for an exception an edge may see, or None for a bug."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, ValidationError):
        return invalid_request_from(exc.errors())
    if isinstance(exc, RedisError):
        return StoreUnavailable()
    if isinstance(exc, SealingError):
        logger.error("a Kling secret cannot be opened: %s", exc)
        return CredentialsUnavailable()
    return None


def error_response(error: GatewayError) -> JSONResponse:
    """The error as REST answers it (also a plain ASGI app, for middleware that answers before any route)."""
    return JSONResponse(error.to_json(), status_code=error.status, headers=error.http_headers())
