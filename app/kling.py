"""KlingClient: the one way the gateway talks to Kling's image API.

One pool of connections per process (httpcore2's, owned by the app lifespan; app/http_pool.py), one cached
HS256 JWT per credential, typed errors that keep the HTTP status, Kling code, message and request_id. Facts behind
it: reference/kling-api.md.

    KlingFailure
    ├── KlingError           Kling answered with a non-zero code (status, code, message, request_id)
    ├── KlingTransportError  no answer: connect failure or timeout (`timed_out`)
    └── KlingProtocolError   an answer that is not Kling's envelope
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, NamedTuple, TypeVar
from urllib.parse import urlsplit

import httpcore2
import jwt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.breaker import Breakers, CircuitOpen
from app.http_pool import TIMEOUTS
from app.metrics import BREAKER_OPEN
from app.models import IMAGE_MODELS, GenerateRequest
from app.observability import kling_call

GENERATIONS_PATH = "/v1/images/generations"
JWT_LIFETIME_S = 1800
# Re-sign when less than this is left, so a token never expires between signing and Kling checking it.
JWT_RENEW_MARGIN_S = 300
CODE_TOKEN_EXPIRED = 1004
LIST_PAGE_MAX = 500  # Kling's largest pageSize (reference/kling-api.md §5)
T = TypeVar("T")


@dataclass(frozen=True)
class KlingCredentials:
    """One Kling account's AK/SK, or with `static_key` its console-made API key (in `secret_key`; `access_key` is
    then a label derived from it), which Kling takes as the bearer token as it is. `repr` hides the secret.
    `credential_id` (the gateway's id of the account) names it in metrics, where the access key must never appear.
    `base_url`: where the account's API is, when not at the gateway's KGW_KLING_BASE_URL (a China account's is
    api-beijing: its keys do not work on the global API)."""

    access_key: str
    secret_key: str
    credential_id: str = ""
    base_url: str = ""
    static_key: bool = False

    def __repr__(self) -> str:
        return f"KlingCredentials(access_key={self.access_key!r}, secret_key='***')"


class KlingFailure(Exception):
    """Any failure of a Kling call."""


class KlingError(KlingFailure):
    def __init__(
        self, http_status: int, code: int, message: str, request_id: str | None, retry_after: float | None = None
    ) -> None:
        super().__init__(f"Kling error {code} (HTTP {http_status}): {message}")
        self.http_status = http_status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after = retry_after  # seconds, when Kling sent a Retry-After (undocumented, honoured if sent)


class KlingTransportError(KlingFailure):
    def __init__(self, message: str, *, timed_out: bool, sent: bool = True, congested: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.sent = sent  # False: the request certainly never reached Kling (no connection), so a retry is safe
        # True: every pooled connection of this process was busy until the pool's timeout. That is this
        # process's congestion (a burst of polls, say), not a verdict on the Kling account.
        self.congested = congested


class KlingProtocolError(KlingFailure):
    pass


class KlingCircuitOpen(KlingFailure):
    """The account failed repeatedly; calls fail fast until `retry_after_s` has passed."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"calls to this Kling account are paused for {retry_after_s:.0f} s after repeated failures")
        self.retry_after_s = retry_after_s


# Failures that say the account or Kling itself is unwell (not this one request): these trip the breaker.
_UNHEALTHY_CODES = frozenset({1000, 1001, 1002, 1003, 1100, 1101, 1102, 1304, 5000, 5001, 5002})


def is_unhealthy(failure: KlingFailure) -> bool:
    if isinstance(failure, KlingError):
        return failure.code in _UNHEALTHY_CODES or failure.http_status >= 500
    if isinstance(failure, KlingTransportError):
        return not failure.congested  # this process's own queue for connections, not the account
    return isinstance(failure, KlingProtocolError)


class KlingImage(BaseModel):
    index: int
    url: str
    watermark_url: str | None = None


class KlingTaskResult(BaseModel):
    images: list[KlingImage] = Field(default_factory=list)


class KlingTaskInfo(BaseModel):
    external_task_id: str | None = None


class KlingTask(BaseModel):
    """The `data` of a create or query answer (unknown fields ignored: Kling adds fields over time)."""

    model_config = ConfigDict(extra="ignore")

    task_id: str
    task_status: str
    task_status_msg: str | None = None
    created_at: int
    updated_at: int
    task_info: KlingTaskInfo = Field(default_factory=KlingTaskInfo)
    task_result: KlingTaskResult = Field(default_factory=KlingTaskResult)


class JwtCache:
    """One token per credential, re-signed `JWT_RENEW_MARGIN_S` before it expires."""

    def __init__(self, lifetime_s: int = JWT_LIFETIME_S) -> None:
        self._lifetime_s = lifetime_s
        self._tokens: dict[str, tuple[str, float]] = {}

    def token(self, credentials: KlingCredentials, *, force_new: bool = False) -> str:
        if credentials.static_key:
            return credentials.secret_key  # sent as it is (reference/kling-api.md §2): nothing to sign or cache
        # Keyed by a digest of both keys so a rotated secret never reuses a token signed with the old one.
        cache_key = hashlib.sha256(f"{credentials.access_key}\0{credentials.secret_key}".encode()).hexdigest()
        cached = self._tokens.get(cache_key)
        now = time.time()
        if cached and not force_new and cached[1] - now > JWT_RENEW_MARGIN_S:
            return cached[0]
        expires_at = int(now) + self._lifetime_s
        token = jwt.encode(
            {"iss": credentials.access_key, "exp": expires_at, "nbf": int(now) - 5},
            credentials.secret_key,
            algorithm="HS256",
            headers={"typ": "JWT"},
        )
        self._tokens[cache_key] = (token, expires_at)
        return token


def build_generation_body(
    request: GenerateRequest, *, external_task_id: str | None = None, callback_url: str | None = None
) -> dict[str, Any]:
    """Map the tool's arguments onto Kling's documented create fields (reference/kling-api.md §4)."""
    body: dict[str, Any] = {
        "model_name": request.model_name,
        "prompt": request.prompt,
        "n": request.num_images,
        "aspect_ratio": request.aspect_ratio,
    }
    if request.ref_image_url is not None:
        body["image"] = request.ref_image_url
        if request.ref_image_weight is not None and IMAGE_MODELS[request.model_name].image_fidelity:
            body["image_fidelity"] = request.ref_image_weight
    elif request.negative_prompt:
        body["negative_prompt"] = request.negative_prompt
    optional = {
        "image_reference": request.image_reference,
        "human_fidelity": request.human_fidelity,
        "resolution": request.resolution,
        "external_task_id": external_task_id,
        "callback_url": callback_url,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    return body


@dataclass(frozen=True)
class _Request(Generic[T]):
    """One call to Kling: where, what, and how to read the `data` of its answer."""

    credentials: KlingCredentials
    endpoint: str  # the metric's and span's name for the call: create, query or list
    method: str
    path: str
    body: dict[str, Any] | None
    parse: Callable[[Any], T]


class KlingClient:
    """Typed calls to Kling's image endpoints over the shared pool."""

    def __init__(
        self,
        pool: httpcore2.AsyncConnectionPool,
        base_url: str,
        *,
        deadline_s: float = 30.0,
        breakers: Breakers | None = None,
    ) -> None:
        self._pool = pool
        self._default_base = base_url
        # Each base URL split once: a URL string would be parsed again by httpcore2 on every call.
        self._bases: dict[str, _Base] = {}
        self._deadline_s = deadline_s
        self._jwts = JwtCache()
        self._breakers = breakers or Breakers()
        self._breakers_reported: set[str] = set()

    async def create_image_task(self, credentials: KlingCredentials, body: dict[str, Any]) -> KlingTask:
        return await self._call(_Request(credentials, "create", "POST", GENERATIONS_PATH, body, _one_task))

    async def get_image_task(self, credentials: KlingCredentials, task_id: str) -> KlingTask:
        """Look a task up by Kling's task_id or by the external_task_id the gateway chose."""
        return await self._call(_Request(credentials, "query", "GET", f"{GENERATIONS_PATH}/{task_id}", None, _one_task))

    async def list_image_tasks(
        self, credentials: KlingCredentials, page_size: int, wanted: frozenset[str], page_number: int = 1
    ) -> dict[str, KlingTask]:
        """The `wanted` tasks on page `page_number` of the account's tasks, newest first, `page_size` a page
        (Kling's list filters on nothing else); only those are read, so a long page costs little more than its
        bytes."""
        path = f"{GENERATIONS_PATH}?pageNum={page_number}&pageSize={max(1, min(page_size, LIST_PAGE_MAX))}"
        return await self._call(_Request(credentials, "list", "GET", path, None, partial(_wanted_tasks, wanted=wanted)))

    async def _call(self, request: _Request[T]) -> T:
        """Kling's answer, its envelope checked and its `data` read by `request.parse`, or a typed failure."""
        credentials = request.credentials
        key = credentials.access_key
        if key not in self._breakers_reported:  # the gauge shows each credential, closed until it opens
            self._breakers_reported.add(key)
            _report_breaker(credentials, opened=False)
        try:
            self._breakers.before_call(key)
        except CircuitOpen as exc:
            raise KlingCircuitOpen(exc.retry_after_s) from exc
        try:
            data = await self._send_resigning(request)
        except KlingFailure as exc:
            if isinstance(exc, KlingTransportError) and exc.congested:
                self._breakers.abandoned(key)  # it never left this process: no verdict on the account
            elif is_unhealthy(exc):
                if self._breakers.failed(key):
                    _report_breaker(credentials, opened=True)
            elif self._breakers.neutral(key):
                _report_breaker(credentials, opened=False)
            raise
        except BaseException:
            self._breakers.abandoned(key)  # cancelled: no verdict on the account
            raise
        if self._breakers.succeeded(key):
            _report_breaker(credentials, opened=False)
        return data

    async def _send_resigning(self, request: _Request[T]) -> T:
        try:
            return await self._send(request, force_new_token=False)
        except KlingError as exc:
            # A token can expire between our clock and Kling's; re-sign once, as Kling's docs advise.
            if exc.code != CODE_TOKEN_EXPIRED or request.credentials.static_key:
                raise
            return await self._send(request, force_new_token=True)

    async def _send(self, request: _Request[T], *, force_new_token: bool) -> T:
        method, path, body = request.method, request.path, request.body
        headers, content = encode_call(self._jwts.token(request.credentials, force_new=force_new_token), body)
        base = self._base(request.credentials.base_url or self._default_base)
        url = httpcore2.URL(scheme=base.scheme, host=base.host, port=base.port, target=base.prefix + path)
        with kling_call(request.endpoint, failure_code) as call:
            try:
                # The pool's timeouts are per phase; a slow drip would never trip them, so bound the whole call.
                async with asyncio.timeout(self._deadline_s):
                    response = await self._pool.request(method, url, headers=headers,
                                                        content=content, extensions={"timeout": TIMEOUTS})  # fmt: skip
            except httpcore2.PoolTimeout as exc:
                raise KlingTransportError(f"{method} {path}: no free connection to Kling in time", timed_out=True,
                                          sent=False, congested=True) from exc  # fmt: skip
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                timed_out = not isinstance(exc, httpcore2.ConnectError)
                raise KlingTransportError(f"{method} {path}: no connection ({type(exc).__name__})",
                                          timed_out=timed_out, sent=False) from exc  # fmt: skip
            except (TimeoutError, httpcore2.TimeoutException) as exc:
                raise KlingTransportError(f"{method} {path} timed out", timed_out=True) from exc
            except _TRANSPORT_ERRORS as exc:
                raise KlingTransportError(f"{method} {path} failed: {type(exc).__name__}", timed_out=False) from exc
            data = request.parse(parse_envelope(response))
            call.answered(0, data.task_id if isinstance(data, KlingTask) else None)
        return data

    def _base(self, base_url: str) -> _Base:
        base = self._bases.get(base_url)
        if base is None:
            parts = urlsplit(base_url.rstrip("/"))
            base = self._bases[base_url] = _Base(parts.scheme, parts.hostname or "", parts.port, parts.path)
        return base


class _Base(NamedTuple):
    scheme: str
    host: str
    port: int | None
    prefix: str


def encode_call(token: str, body: dict[str, Any] | None) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """The headers and body (compact JSON) of a call to Kling signed with `token`."""
    headers = [(b"Authorization", f"Bearer {token}".encode()), (b"Accept", b"application/json")]
    if body is None:
        return headers, None
    headers.append((b"Content-Type", b"application/json"))
    return headers, json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _report_breaker(credentials: KlingCredentials, *, opened: bool) -> None:
    """Set the breaker gauge (by credential id, never the access key); only when the breaker opens or closes."""
    BREAKER_OPEN.labels(credentials.credential_id or "unnamed").set(1 if opened else 0)


def failure_code(failure: BaseException) -> str:
    """How a Kling call failed, as a metric label: Kling's code, or what happened instead of an answer."""
    if isinstance(failure, KlingError):
        return str(failure.code)
    if isinstance(failure, KlingTransportError):
        return "timeout" if failure.timed_out else "no_answer"
    if isinstance(failure, KlingProtocolError):
        return "bad_answer"
    return "cancelled" if isinstance(failure, asyncio.CancelledError) else "error"


# What else can go wrong between sending and a whole answer: the connection breaking, or bytes that are not HTTP.
_TRANSPORT_ERRORS = (httpcore2.NetworkError, httpcore2.ProtocolError, httpcore2.UnsupportedProtocol)


def parse_envelope(response: httpcore2.Response) -> Any:
    """Return the `data` of a successful answer; raise the matching typed error otherwise."""
    status = response.status
    try:
        envelope = json.loads(response.content)
    except ValueError as exc:  # UnicodeDecodeError is one too
        raise KlingProtocolError(f"HTTP {status} with a body that is not JSON") from exc
    if not isinstance(envelope, dict) or not isinstance(envelope.get("code"), int):
        raise KlingProtocolError(f"HTTP {status} without Kling's envelope")
    code: int = envelope["code"]
    request_id = envelope.get("request_id")
    if code != 0 or status >= 400:
        message = str(envelope.get("message") or "no message")
        request_id = request_id if isinstance(request_id, str) else None
        raise KlingError(status, code, message, request_id, _retry_after(response))
    return envelope.get("data")


def _one_task(data: Any) -> KlingTask:
    try:
        return KlingTask.model_validate(data)
    except ValidationError as exc:
        raise KlingProtocolError("a success envelope without a valid task") from exc


def _wanted_tasks(data: Any, wanted: frozenset[str]) -> dict[str, KlingTask]:
    if not isinstance(data, list):
        raise KlingProtocolError("a list answer whose data is not a list")
    try:
        return {
            item["task_id"]: KlingTask.model_validate(item)
            for item in data
            if isinstance(item, dict) and item.get("task_id") in wanted
        }
    except ValidationError as exc:
        raise KlingProtocolError("a list answer with an invalid task") from exc


def _retry_after(response: httpcore2.Response) -> float | None:
    value = next((value for name, value in response.headers if name.lower() == b"retry-after"), b"")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
