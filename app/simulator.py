"""A local fake of Kling's image API (kling-api.md §2-9, §11) for tests, the demo and benchmarks.

Task status is derived from elapsed monotonic time rather than advanced by timers, so idle tasks cost nothing;
only tasks with a `callback_url` get a background task. Handlers never await between checking capacity and
recording a task, which is what keeps per-account slot accounting race-free on one event loop.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import hashlib
import heapq
import io
import json
import logging
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx2
import jwt
import uvicorn
from anyio.abc import TaskGroup
from PIL import Image, ImageDraw
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

logger = logging.getLogger(__name__)

T = TypeVar("T")
_Endpoint = Callable[[Request], Awaitable[Response]]

MODELS = frozenset({"kling-v1", "kling-v1-5", "kling-v2", "kling-v2-new", "kling-v2-1", "kling-v3"})
ASPECT_RATIOS = {"16:9": (16, 9), "9:16": (9, 16), "1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4), "3:2": (3, 2),
                 "2:3": (2, 3), "21:9": (21, 9)}  # fmt: skip
LONG_SIDE = {"1k": 512, "2k": 1024}  # far below Kling's sizes: renders and downloads stay cheap in benchmarks
_STR_LIMITS = {"prompt": 2500, "negative_prompt": 2500, "model_name": 64, "model": 64, "image": 14_000_000,
               "image_reference": 16, "resolution": 8, "aspect_ratio": 8, "callback_url": 2048,
               "external_task_id": 256}  # fmt: skip
_FIELDS = frozenset({*_STR_LIMITS, "image_fidelity", "human_fidelity", "element_list", "n", "watermark_info"})
_CHOICES: dict[str, Any] = {
    "aspect_ratio": ASPECT_RATIOS,
    "resolution": LONG_SIDE,
    "image_reference": ("subject", "face"),
}
_PROCESSING_AT = 0.3
_TERMINAL = ("succeed", "failed")
_IMAGE_NAME = re.compile(r"(\d+)(-wm)?\.png")
_FAULT_MESSAGES = {1302: "request too fast, rate limit exceeded", 1303: "parallel task over resource pack limit",
                   5000: "internal error", 5001: "service temporarily unavailable",
                   5002: "internal timeout"}  # fmt: skip
# create_attempts: every authenticated create, faulted or not; creates: the ones that made a task.
# "queries" counts every status read, single or listed; "lists" how many of those were list calls.
_COUNTERS = ("creates", "create_attempts", "queries", "lists", "rejected_1303", "callbacks_sent", "callbacks_failed")


@dataclass(frozen=True)
class SimAccount:
    access_key: str
    secret_key: str
    concurrency: int = 5  # image slots in flight for this account (a task holds n slots)
    api_key: str | None = None  # a static API key the account also takes as its bearer token (no JWT)


@dataclass(frozen=True)
class SimulatorConfig:
    accounts: tuple[SimAccount, ...]
    delay: float = 2.0  # seconds from submit to terminal state; "processing" starts at delay * 0.3
    callback_timeout: float = 5.0  # timeout for each callback POST


class _KlingError(Exception):
    def __init__(self, http_status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.http_status, self.code, self.message = http_status, code, message


class _BadControl(Exception):
    pass


def _invalid(message: str) -> _KlingError:
    return _KlingError(400, 1201, message)


def _status_for(code: int) -> int:
    """The HTTP status Kling pairs with an error code (kling-api.md §6)."""
    ranges = ((1000, 1004, 401), (1100, 1102, 429), (1103, 1103, 403), (1202, 1203, 404), (1302, 1304, 429))
    return next((s for lo, hi, s in ranges if lo <= code <= hi), {5000: 500, 5001: 503, 5002: 504}.get(code, 400))


@dataclass(frozen=True)
class _Spec:
    n: int
    aspect_ratio: str
    resolution: str
    watermark: bool
    external_task_id: str | None
    callback_url: str | None


@dataclass
class _Task:
    task_id: str
    access_key: str
    spec: _Spec
    outcome: tuple[str, str]  # terminal status and its task_status_msg
    started: float  # monotonic
    created_ms: int
    base_url: str  # of the create request, for the image URLs in callbacks
    # Seconds from create to "processing" and to the end: from the configured delay, unless `POST /_sim/finish`
    # brought them forward.
    processing_at: float
    delay: float

    def phase(self) -> tuple[str, float]:
        """The current status and the offset (s) at which it began."""
        elapsed = time.monotonic() - self.started
        if elapsed >= self.delay:
            return self.outcome[0], self.delay
        if elapsed >= self.processing_at:
            return "processing", self.processing_at
        return "submitted", 0.0


VERIFIED_KEPT = 4096  # verified tokens remembered, the oldest forgotten first


@dataclass(frozen=True, slots=True)
class _Verified:
    access_key: str
    nbf: int  # valid from (s since the epoch, whole, as PyJWT reads it): not before nbf
    exp: int  # valid until, exclusive: expired at exp


class _SlotsInUse:
    """One account's tasks that may still hold image slots, by when they end, and their images in all. Every
    create asks how many slots are in use: a scan of the running tasks would cost it more the more there are (a
    benchmark holds thousands), where popping those that ended costs it nothing while none has."""

    def __init__(self) -> None:
        self._tasks: dict[str, _Task] = {}
        self._ends: list[tuple[float, str]] = []  # a heap of (when the task ends, its id)
        self._images = 0

    def add(self, task: _Task) -> None:
        self._tasks[task.task_id] = task
        heapq.heappush(self._ends, (task.started + task.delay, task.task_id))
        self._images += task.spec.n

    def used(self) -> int:
        while self._ends:
            task = self._tasks[self._ends[0][1]]
            if task.phase()[0] not in _TERMINAL:
                break
            heapq.heappop(self._ends)
            del self._tasks[task.task_id]
            self._images -= task.spec.n
        return self._images

    def rescheduled(self) -> None:
        """The tasks' ends were brought forward (`POST /_sim/finish`)."""
        self._ends = [(task.started + task.delay, task.task_id) for task in self._tasks.values()]
        heapq.heapify(self._ends)


@dataclass
class _Rule(Generic[T]):
    value: T
    times: int
    path: str


def _take(rules: list[_Rule[T]], kind: str) -> T | None:
    for rule in rules:
        if rule.path in ("any", kind):
            rule.times -= 1
            if rule.times <= 0:
                rules.remove(rule)
            return rule.value
    return None


@dataclass
class _State:
    tasks: dict[str, _Task] = field(default_factory=dict)
    external: dict[tuple[str, str], str] = field(default_factory=dict)  # (access key, external id) -> task id
    # Each account's tasks, oldest first: a list call pages through its own, not through every account's.
    by_account: defaultdict[str, list[_Task]] = field(default_factory=lambda: defaultdict(list))
    # access key -> its tasks maybe holding slots
    active: defaultdict[str, _SlotsInUse] = field(default_factory=lambda: defaultdict(_SlotsInUse))
    faults: list[_Rule[_KlingError]] = field(default_factory=list)
    slow: list[_Rule[float]] = field(default_factory=list)
    malformed: list[_Rule[bool]] = field(default_factory=list)
    outcomes: list[_Rule[tuple[str, str]]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)  # the _COUNTERS


_TIMER_SLACK_S = 0.005


def _envelope(data: Any) -> JSONResponse:
    return JSONResponse({"code": 0, "message": "SUCCEED", "request_id": str(uuid.uuid4()), "data": data})


async def _read_object(request: Request) -> dict[str, Any] | None:
    try:
        body = json.loads(await request.body())
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _check_scalars(body: dict[str, Any]) -> None:
    for key, limit in _STR_LIMITS.items():
        value = body.get(key)
        if key not in body:
            continue
        if not isinstance(value, str) or len(value) > limit or (not value and key not in ("model_name", "model")):
            raise _invalid(f"{key} must be a string of 1 to {limit} characters")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise _invalid(f"{key} value '{value}' is invalid")
    for key in ("image_fidelity", "human_fidelity"):
        value = body.get(key, 0.5)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise _invalid(f"{key} must be a number between 0 and 1")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 9:
        raise _invalid("n must be an integer between 1 and 9")


def _check_image(body: dict[str, Any]) -> None:
    image = body.get("image")
    if image is not None and not image.startswith(("http://", "https://")):
        if image.startswith("data:"):
            raise _invalid("image must be a URL or raw base64 without a data: prefix")
        try:
            binascii.a2b_base64(image.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise _invalid("image is neither an http(s) URL nor valid base64") from exc
    if image is not None and "negative_prompt" in body:
        raise _invalid("negative_prompt is not supported when image is set")
    if "image_reference" in body and image is None:
        raise _invalid("image_reference requires image")
    if "human_fidelity" in body and body.get("image_reference") != "subject":
        raise _invalid("human_fidelity requires image_reference=subject")


def _check_objects(body: dict[str, Any]) -> None:
    elements = body.get("element_list", [])
    if not isinstance(elements, list) or not all(isinstance(e, dict) and "element_id" in e for e in elements):
        raise _invalid("element_list must be a list of {element_id}")
    if len(elements) + ("image" in body) > 10:
        raise _invalid("element_list and reference images exceed 10")
    mark = body.get("watermark_info", {})
    if not isinstance(mark, dict) or set(mark) - {"enabled"} or not isinstance(mark.get("enabled", False), bool):
        raise _invalid("watermark_info must be {enabled: bool}")
    url = urlsplit(body.get("callback_url", "http://x"))
    if url.scheme not in ("http", "https") or not url.netloc:
        raise _invalid("callback_url must be an http(s) URL")


def _validate(body: dict[str, Any]) -> _Spec:
    """Check a create body the way Kling does (kling-api.md §4); unknown keys are refused, not ignored."""
    unknown = sorted(body.keys() - _FIELDS)
    if unknown:
        raise _invalid(f'"{unknown[0]}" is not a valid parameter')
    if "prompt" not in body:
        raise _invalid("prompt is required")
    _check_scalars(body)
    model = body.get("model_name", body.get("model", "kling-v3")) or "kling-v1"  # empty means V1, as documented
    if model not in MODELS:
        raise _KlingError(404, 1203, f"model_name '{model}' does not exist")
    _check_image(body)
    _check_objects(body)
    aspect = body.get("aspect_ratio", "16:9")
    if aspect == "21:9" and model == "kling-v1":
        raise _invalid("aspect_ratio value '21:9' is invalid for kling-v1")
    watermark = body.get("watermark_info", {}).get("enabled", False)
    resolution, ext = body.get("resolution", "1k"), body.get("external_task_id")
    return _Spec(body.get("n", 1), aspect, resolution, watermark, ext, body.get("callback_url"))


def _image_size(spec: _Spec) -> tuple[int, int]:
    w, h = ASPECT_RATIOS[spec.aspect_ratio]
    side = LONG_SIDE[spec.resolution]
    return (side, round(side * h / w)) if w >= h else (round(side * w / h), side)


@functools.lru_cache(maxsize=256)
def _render_png(width: int, height: int, index: int, task_id: str, watermark: bool) -> bytes:
    r, g, b = hashlib.sha256(f"{task_id}:{index}".encode()).digest()[:3]
    img = Image.new("RGB", (width, height), (r, g, b))
    draw = ImageDraw.Draw(img)
    draw.ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(255 - r, 255 - g, 255 - b))
    font_size = max(12, height // 12)
    draw.text((8, 8), f"#{index} {task_id[:8]}", fill=(255, 255, 255), font_size=font_size)
    if watermark:
        draw.text((8, height - font_size - 8), "KLING AI", fill=(255, 255, 255), font_size=font_size)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class _Simulator:
    def __init__(self, config: SimulatorConfig) -> None:
        self._config = config
        self._accounts = {account.access_key: account for account in config.accounts}
        self._api_keys = {account.api_key: account.access_key for account in config.accounts if account.api_key}
        self._s = _State()
        self._http: httpx2.AsyncClient | None = None
        self._tg: TaskGroup | None = None
        self._rescheduled = asyncio.Event()  # set (and replaced) when `POST /_sim/finish` moves tasks' ends
        # Tokens whose signature was checked, for as long as they are valid: a client signs a token and sends it
        # for its whole life (the gateway: about half an hour), so the signature is checked once, not per request.
        self._verified: dict[str, _Verified] = {}

    @asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        async with httpx2.AsyncClient(timeout=self._config.callback_timeout) as http, anyio.create_task_group() as tg:
            self._http, self._tg = http, tg
            try:
                yield
            finally:
                self._http = self._tg = None
                tg.cancel_scope.cancel()

    def endpoint(self, kind: str, work: Callable[[Request, str], Awaitable[Response]]) -> _Endpoint:
        async def handle(request: Request) -> Response:
            return await self._api(request, kind, work)

        return handle

    async def _api(self, request: Request, kind: str, work: Callable[[Request, str], Awaitable[Response]]) -> Response:
        """Auth, then scripted behaviour or the real work, then any scripted slowness."""
        try:
            access_key = self._authenticate(request)
        except _KlingError as exc:
            return self._error(exc)
        self._s.counts["queries"] += kind == "query"
        self._s.counts["create_attempts"] += kind == "create"
        pause = _take(self._s.slow, kind)
        response = self._scripted(kind)
        if response is None:
            try:
                response = await work(request, access_key)
            except _KlingError as exc:
                response = self._error(exc)
        if pause:
            # After the work, so a create whose client timed out has still created its task, as on Kling.
            await anyio.sleep(pause)
        return response

    def _scripted(self, kind: str) -> Response | None:
        fault = _take(self._s.faults, kind)
        if fault is not None:
            return self._error(fault)
        if _take(self._s.malformed, kind):
            return Response("<html>oops", media_type="text/html")
        return None

    def _error(self, exc: _KlingError) -> JSONResponse:
        body: dict[str, Any] = {"code": exc.code, "message": exc.message, "request_id": str(uuid.uuid4())}
        if exc.code == 1303:
            self._s.counts["rejected_1303"] += 1
        else:
            body["data"] = None  # Kling's 1303 sample is the only error documented without `data`
        return JSONResponse(body, status_code=exc.http_status)

    def _authenticate(self, request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        token = token.strip()
        if not scheme or (scheme.lower() == "bearer" and not token):
            raise _KlingError(401, 1001, "Authorization is empty")
        try:
            if scheme.lower() != "bearer":
                raise jwt.InvalidTokenError("not a bearer token")
            static = self._api_keys.get(token)
            if static is not None:
                return static
            verified = self._verified.get(token)
            if verified is not None and verified.nbf <= time.time() < verified.exp:
                return verified.access_key
            # Unverified only to find whose secret to check the signature with.
            account = self._accounts.get(jwt.decode(token, options={"verify_signature": False}).get("iss", ""))
            if account is None:
                raise jwt.InvalidIssuerError("unknown issuer")
            claims = jwt.decode(token, account.secret_key, algorithms=["HS256"], options={"require": ["exp", "nbf"]})
            self._remember(token, _Verified(account.access_key, int(claims["nbf"]), int(claims["exp"])))
        except jwt.ImmatureSignatureError as exc:
            raise _KlingError(401, 1003, "Authorization is not active yet") from exc
        except jwt.ExpiredSignatureError as exc:
            raise _KlingError(401, 1004, "Authorization is expired") from exc
        except (jwt.InvalidTokenError, TypeError) as exc:  # TypeError: a non-string `iss`
            raise _KlingError(401, 1002, "Authorization is not valid") from exc
        return account.access_key

    def _remember(self, token: str, verified: _Verified) -> None:
        self._verified[token] = verified
        if len(self._verified) > VERIFIED_KEPT:
            del self._verified[next(iter(self._verified))]  # the oldest

    async def create(self, request: Request, access_key: str) -> Response:
        body = await _read_object(request)
        if body is None:
            raise _KlingError(400, 1200, "invalid request body: expected a JSON object")
        spec = _validate(body)
        if spec.external_task_id is not None and (access_key, spec.external_task_id) in self._s.external:
            raise _invalid("external_task_id already exists")
        if self._slots_used(access_key) + spec.n > self._accounts[access_key].concurrency:
            raise _KlingError(429, 1303, "parallel task over resource pack limit")
        outcome = _take(self._s.outcomes, "create") or ("succeed", "")
        task = _Task(str(uuid.uuid4().int)[:19], access_key, spec, outcome, time.monotonic(),
                     int(time.time() * 1000), str(request.base_url), self._config.delay * _PROCESSING_AT,
                     self._config.delay)  # fmt: skip
        self._record(task)
        info = self._task_data(task, task.base_url)
        return _envelope({k: info[k] for k in ("task_id", "task_status", "task_info", "created_at", "updated_at")})

    def _slots_used(self, access_key: str) -> int:
        return self._s.active[access_key].used()

    def _record(self, task: _Task) -> None:
        self._s.tasks[task.task_id] = task
        self._s.by_account[task.access_key].append(task)
        self._s.active[task.access_key].add(task)
        if task.spec.external_task_id is not None:
            self._s.external[(task.access_key, task.spec.external_task_id)] = task.task_id
        self._s.counts["creates"] += 1
        if task.spec.callback_url is not None and self._tg is None:
            logger.warning("simulator lifespan is not running: no callbacks for task %s", task.task_id)
        elif task.spec.callback_url is not None and self._tg is not None:
            self._tg.start_soon(self._deliver_callbacks, task)

    async def query(self, request: Request, access_key: str) -> Response:
        ident = request.path_params["task_id"]
        task = self._s.tasks.get(ident)
        if task is None or task.access_key != access_key:
            task = self._s.tasks.get(self._s.external.get((access_key, ident), ""))
        if task is None:
            raise _KlingError(404, 1203, "task not found")
        return _envelope(self._task_data(task, str(request.base_url)))

    async def list_tasks(self, request: Request, access_key: str) -> Response:
        self._s.counts["lists"] += 1
        page = _page_param(request, "pageNum", 1, 1000)
        size = _page_param(request, "pageSize", 30, 500)
        mine = self._s.by_account.get(access_key, [])
        newest, oldest = len(mine) - (page - 1) * size, len(mine) - page * size  # pages count from the newest
        base_url = str(request.base_url)
        return _envelope([self._task_data(task, base_url) for task in reversed(mine[max(0, oldest) : max(0, newest)])])

    def _task_data(self, task: _Task, base_url: str) -> dict[str, Any]:
        status, since = task.phase()
        prefix, ext = f"{base_url}images/{task.task_id}", task.spec.external_task_id
        images = [{"index": i, "url": f"{prefix}/{i}.png", "watermark_url": f"{prefix}/{i}-wm.png"}
                  for i in range(task.spec.n)]  # fmt: skip
        return {
            "task_id": task.task_id,
            "task_status": status,
            "task_status_msg": task.outcome[1] if status == "failed" else "",
            "final_unit_deduction": str(task.spec.n),
            "watermark_info": {"enabled": task.spec.watermark},
            "task_info": {} if ext is None else {"external_task_id": ext},
            "created_at": task.created_ms,
            "updated_at": task.created_ms + int(since * 1000),
            "task_result": {"images": images} if status == "succeed" else {},
        }

    async def _deliver_callbacks(self, task: _Task) -> None:
        last = ""
        for at_end in (False, True):
            # Re-read after each wake: `POST /_sim/finish` may have brought the offset forward.
            while (remaining := task.started + (task.delay if at_end else task.processing_at) - time.monotonic()) > 0:
                # A little past the offset: event-loop timers may fire up to a clock tick early.
                with anyio.move_on_after(remaining + _TIMER_SLACK_S):
                    await self._rescheduled.wait()
            status = task.phase()[0]
            if self._s.tasks.get(task.task_id) is task and status != last:  # skip tasks forgotten by a reset
                last = status
                await self._post_callback(task)

    async def _post_callback(self, task: _Task) -> None:
        assert self._http is not None
        assert task.spec.callback_url is not None
        try:
            response = await self._http.post(task.spec.callback_url, json=self._task_data(task, task.base_url))
            response.raise_for_status()
        except httpx2.HTTPError as exc:
            self._s.counts["callbacks_failed"] += 1
            logger.warning("callback for task %s failed: %s", task.task_id, type(exc).__name__)
        else:
            self._s.counts["callbacks_sent"] += 1

    async def image(self, request: Request) -> Response:
        task = self._s.tasks.get(request.path_params["task_id"])
        name = _IMAGE_NAME.fullmatch(request.path_params["name"])
        if task is None or name is None or int(name[1]) >= task.spec.n:
            return PlainTextResponse("Not Found", status_code=404)
        if task.phase()[0] != "succeed":
            return PlainTextResponse("Not Found", status_code=404)
        # About 20 ms at 1024 px: too long to hold the event loop under benchmark load.
        args = (*_image_size(task.spec), int(name[1]), task.task_id, bool(name[2]))
        return Response(await anyio.to_thread.run_sync(_render_png, *args), media_type="image/png")

    async def control(self, request: Request) -> Response:
        what = request.path_params["what"]
        handler = {"faults": self._add_fault, "slow": self._add_slow, "malformed": self._add_malformed,
                   "outcomes": self._add_outcome, "accounts": self._set_account,
                   "finish": self._finish_running}.get(what)  # fmt: skip
        if handler is None:
            return await _spring_404(request)
        body = await _read_object(request)
        try:
            if body is None:
                raise _BadControl("body must be a JSON object")
            handler(body)
        except _BadControl as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"ok": True})

    def _add_fault(self, body: dict[str, Any]) -> None:
        code = _ctl(body, "code", int, None)
        message = _ctl(body, "message", str, _FAULT_MESSAGES.get(code, "simulated error"))
        fault = _KlingError(_ctl(body, "http_status", int, _status_for(code)), code, message)
        self._s.faults.append(_Rule(fault, *_times_path(body)))

    def _add_slow(self, body: dict[str, Any]) -> None:
        seconds = body.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise _BadControl("seconds must be a non-negative number")
        self._s.slow.append(_Rule(float(seconds), *_times_path(body)))

    def _add_malformed(self, body: dict[str, Any]) -> None:
        self._s.malformed.append(_Rule(True, *_times_path(body)))

    def _add_outcome(self, body: dict[str, Any]) -> None:
        status = _ctl(body, "status", str, "failed")
        if status not in _TERMINAL:
            raise _BadControl("status must be 'failed' or 'succeed'")
        message = _ctl(body, "message", str, "simulated failure" if status == "failed" else "")
        self._s.outcomes.append(_Rule((status, message), _times_path(body)[0], "create"))

    def _finish_running(self, body: dict[str, Any]) -> None:
        """End every running task within `within_s` seconds, in creation order at an even pace: a benchmark
        holds thousands of waiting tasks, then lets them finish without waiting out the whole delay. A task
        still "submitted" goes straight to its end, so its callbacks are one, at its end, not a burst of
        "processing" callbacks for every task at once."""
        within = body.get("within_s", 0.0)
        if isinstance(within, bool) or not isinstance(within, int | float) or within < 0:
            raise _BadControl("within_s must be a non-negative number")
        now = time.monotonic()
        running = sorted((t for t in self._s.tasks.values() if t.phase()[0] not in _TERMINAL), key=lambda t: t.started)
        for index, task in enumerate(running, start=1):
            task.delay = now - task.started + within * index / len(running)
            task.processing_at = min(task.processing_at, task.delay)
        for slots in self._s.active.values():
            slots.rescheduled()
        self._rescheduled.set()
        self._rescheduled = asyncio.Event()

    def _set_account(self, body: dict[str, Any]) -> None:
        key, secret = _ctl(body, "access_key", str, None), _ctl(body, "secret_key", str, None)
        api_key = body.get("api_key")
        if api_key is not None and not isinstance(api_key, str):
            raise _BadControl("api_key must be a str")
        account = SimAccount(key, secret, _ctl(body, "concurrency", int, 5), api_key or None)
        if not key or not secret or account.concurrency < 1:
            raise _BadControl("access_key and secret_key must be non-empty and concurrency >= 1")
        self._accounts[key] = account
        self._api_keys = {k: v for k, v in self._api_keys.items() if v != key}  # its old API key no longer works
        if account.api_key:
            self._api_keys[account.api_key] = key
        self._verified.clear()  # a token verified under the account's old secret is no longer

    async def stats(self, _request: Request) -> Response:
        in_flight = {key: self._slots_used(key) for key in self._accounts.keys() | self._s.active.keys()}
        return JSONResponse({name: self._s.counts[name] for name in _COUNTERS} | {"in_flight": in_flight})

    async def reset(self, _request: Request) -> Response:
        self._s = _State()
        return JSONResponse({"ok": True})


def _ctl(body: dict[str, Any], key: str, kind: type[T], default: T | None) -> T:
    value = body.get(key, default)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _BadControl(f"{key} must be a {kind.__name__}")
    return value


def _times_path(body: dict[str, Any]) -> tuple[int, str]:
    times, path = _ctl(body, "times", int, 1), _ctl(body, "path", str, "any")
    if times < 1 or path not in ("create", "query", "any"):
        raise _BadControl("times must be >= 1 and path one of create, query, any")
    return times, path


def _page_param(request: Request, name: str, default: int, maximum: int) -> int:
    raw = request.query_params.get(name, str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise _invalid(f"{name} must be an integer between 1 and {maximum}")
    return int(raw)


async def _spring_404(request: Request, _exc: Exception | None = None) -> Response:
    timestamp = datetime.now(UTC).isoformat(timespec="milliseconds")
    body = {"timestamp": timestamp, "status": 404, "error": "Not Found", "path": request.url.path}
    return JSONResponse(body, status_code=404)


async def _wrong_method(_request: Request, _exc: Exception) -> Response:
    body = {"code": 1202, "message": "invalid request method", "request_id": str(uuid.uuid4()), "data": None}
    return JSONResponse(body, status_code=404)


def create_simulator_app(config: SimulatorConfig) -> Starlette:
    """Build a fresh simulator; each app owns its tasks, accounts and callback client."""
    sim = _Simulator(config)
    routes = [
        Route("/v1/images/generations", sim.endpoint("create", sim.create), methods=["POST"]),
        Route("/v1/images/generations", sim.endpoint("query", sim.list_tasks), methods=["GET"]),
        Route("/v1/images/generations/{task_id}", sim.endpoint("query", sim.query), methods=["GET"]),
        Route("/images/{task_id}/{name}", sim.image, methods=["GET"]),
        Route("/_sim/stats", sim.stats, methods=["GET"]),
        Route("/_sim/reset", sim.reset, methods=["POST"]),
        Route("/_sim/{what}", sim.control, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=sim.lifespan, exception_handlers={404: _spring_404, 405: _wrong_method})


async def serve_simulator(config: SimulatorConfig, host: str, port: int) -> None:
    """Run the simulator under uvicorn until cancelled (used by the CLI `kling-gateway simulator` and the demo)."""
    app = create_simulator_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, lifespan="on", log_level="warning"))
    serving = asyncio.ensure_future(server.serve())
    try:
        await asyncio.shield(serving)
    except asyncio.CancelledError:
        # Let uvicorn drain and run the lifespan shutdown rather than die mid-request.
        server.should_exit = True
        await serving
        raise
