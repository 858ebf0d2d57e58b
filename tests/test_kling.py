"""KlingClient, JwtCache and build_generation_body against the Kling simulator served on loopback."""

from __future__ import annotations

import base64
import io
import time
from typing import Any

import anyio
import jwt
import pytest
from PIL import Image

from app.errors import error_from_kling
from app.http_pool import create_kling_pool
from app.kling import (
    JwtCache,
    KlingClient,
    KlingCredentials,
    KlingError,
    KlingProtocolError,
    KlingTask,
    KlingTransportError,
    build_generation_body,
)
from app.models import GenerateRequest
from tests.conftest import PRIMARY, SECONDARY, Simulator
from tests.servers import free_port

pytestmark = pytest.mark.anyio

CREDENTIALS = KlingCredentials(PRIMARY.access_key, PRIMARY.secret_key)
OTHER_CREDENTIALS = KlingCredentials(SECONDARY.access_key, SECONDARY.secret_key)
BODY: dict[str, Any] = {"model_name": "kling-v3", "prompt": "a red fox in the snow", "n": 1, "aspect_ratio": "16:9"}
SEED_FIELD_NAMES = ("num_images", "ref_image_url", "ref_image_weight", "model")


def png_base64(width: int = 400, height: int = 400) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


PNG = png_base64()


async def wait_for_terminal(client: KlingClient, credentials: KlingCredentials, task_id: str) -> KlingTask:
    # The simulator derives status from elapsed time and pushes nothing without a callback_url: poll, bounded.
    with anyio.fail_after(5):
        while True:
            task = await client.get_image_task(credentials, task_id)
            if task.task_status in ("succeed", "failed"):
                return task
            await anyio.sleep(0.05)


async def call(client: KlingClient, path: str) -> KlingTask:
    """A create or a query, as the simulator's `path` of a scripted behaviour names them."""
    if path == "create":
        return await client.create_image_task(CREDENTIALS, BODY)
    return await client.get_image_task(CREDENTIALS, "1234567890")


# --- Kling error codes: the client keeps them, error_from_kling maps them for the caller ---

# (code, Kling's HTTP status from kling-api.md §6, caller status, caller type, retry_after)
KLING_CODES = [
    (1000, 401, 502, "kling_auth_failed", None),
    (1001, 401, 502, "kling_auth_failed", None),
    (1002, 401, 502, "kling_auth_failed", None),
    (1003, 401, 502, "kling_auth_failed", None),
    (1004, 401, 502, "kling_auth_failed", None),
    (1100, 429, 403, "kling_account_unavailable", None),
    (1101, 429, 403, "kling_account_unavailable", None),
    (1102, 429, 403, "kling_account_unavailable", None),
    (1103, 403, 403, "kling_forbidden", None),
    (1200, 400, 422, "kling_invalid_request", None),
    (1201, 400, 422, "kling_invalid_request", None),
    (1202, 404, 422, "kling_invalid_request", None),
    (1203, 404, 422, "kling_invalid_request", None),
    (1300, 400, 422, "content_policy", None),
    (1301, 400, 422, "content_policy", None),
    (1302, 429, 429, "kling_busy", 2),
    (1303, 429, 429, "kling_busy", 2),
    (1304, 429, 403, "kling_ip_not_allowed", None),
    (5000, 500, 503, "kling_unavailable", 2),
    (5001, 503, 503, "kling_unavailable", 2),
    (5002, 504, 503, "kling_unavailable", 2),
]


@pytest.mark.parametrize(
    ("code", "http_status", "caller_status", "caller_type", "retry_after"),
    KLING_CODES,
    ids=[str(row[0]) for row in KLING_CODES],
)
async def test_each_kling_error_code_keeps_its_status_message_and_request_id_and_maps_to_the_caller_error(
    simulator: Simulator, code: int, http_status: int, caller_status: int, caller_type: str, retry_after: int | None
) -> None:
    message = f"simulated failure {code}"
    # Twice for 1004: the client re-signs once, so a second expiry is what reaches the caller.
    await simulator.control("faults", {"code": code, "message": message, "path": "create", "times": 2})

    async with create_kling_pool() as http:
        client = KlingClient(http, simulator.url)
        with anyio.fail_after(10), pytest.raises(KlingError) as caught:
            await client.create_image_task(CREDENTIALS, BODY)

    exc = caught.value
    assert (exc.http_status, exc.code, exc.message) == (http_status, code, message)
    assert exc.request_id
    error = error_from_kling(exc)
    assert (error.status, error.type, error.retry_after) == (caller_status, caller_type, retry_after)
    assert error.details == {"kling_code": code, "kling_request_id": exc.request_id}


async def test_a_static_api_key_is_sent_as_the_bearer_token_as_it_is(simulator: Simulator) -> None:
    api_key = "kling-console-key-" + "k" * 40
    await simulator.control("accounts", {"access_key": "ak-console", "secret_key": "sk-console-" + "c" * 32,
                                         "api_key": api_key})  # fmt: skip
    async with create_kling_pool() as http:
        client = KlingClient(http, simulator.url)
        with anyio.fail_after(10):
            created = await client.create_image_task(KlingCredentials("key-1", api_key, static_key=True), BODY)
            with pytest.raises(KlingError) as refused:
                await client.create_image_task(KlingCredentials("key-2", api_key + "x", static_key=True), BODY)
    assert created.task_id
    assert refused.value.code == 1002  # a static key Kling does not know is refused as an unknown token is


def test_a_token_kling_finds_not_yet_valid_points_the_administrator_at_the_clock_not_the_credentials() -> None:
    early = error_from_kling(KlingError(401, 1003, "Authorization is not active", "req-1"))
    wrong = error_from_kling(KlingError(401, 1002, "Authorization is invalid", "req-2"))
    assert "clock" in early.message
    assert "credentials" not in early.message
    assert "credentials" in wrong.message


async def test_an_account_at_its_concurrency_limit_gets_1303_which_the_caller_sees_as_429_with_retry_after(
    simulator: Simulator,
) -> None:
    busy = KlingCredentials("ak-busy", "sk-busy-" + "0123456789abcdef" * 3)
    await simulator.control(
        "accounts", {"access_key": busy.access_key, "secret_key": busy.secret_key, "concurrency": 2}
    )

    async with create_kling_pool() as http:
        client = KlingClient(http, simulator.url)
        with anyio.fail_after(10):
            await client.create_image_task(busy, {**BODY, "n": 2})
            with pytest.raises(KlingError) as caught:
                await client.create_image_task(busy, BODY)

    assert (caught.value.http_status, caught.value.code) == (429, 1303)
    assert caught.value.request_id
    error = error_from_kling(caught.value)
    assert (error.status, error.type, error.retry_after) == (429, "kling_busy", 2)
    stats = await simulator.stats()
    assert (stats["creates"], stats["rejected_1303"]) == (1, 1)


@pytest.mark.parametrize(
    ("body", "http_status", "code"),
    [
        ({**BODY, "num_images": 2}, 400, 1201),
        ({**BODY, "model_name": "kling-v1.5"}, 404, 1203),
    ],
    ids=["seed-field-name", "dotted-model-name"],
)
async def test_a_body_kling_refuses_raises_the_real_code_and_maps_to_invalid_request(
    simulator: Simulator, body: dict[str, Any], http_status: int, code: int
) -> None:
    async with create_kling_pool() as http:
        with anyio.fail_after(10), pytest.raises(KlingError) as caught:
            await KlingClient(http, simulator.url).create_image_task(CREDENTIALS, body)

    assert (caught.value.http_status, caught.value.code) == (http_status, code)
    error = error_from_kling(caught.value)
    assert (error.status, error.type) == (422, "kling_invalid_request")


# --- authentication ---


@pytest.mark.parametrize(
    "credentials",
    [
        KlingCredentials(PRIMARY.access_key, "sk-wrong-" + "0123456789abcdef" * 3),
        KlingCredentials("ak-nobody", PRIMARY.secret_key),
    ],
    ids=["wrong-secret-key", "unknown-access-key"],
)
async def test_credentials_kling_does_not_recognise_raise_1002_with_http_401(
    simulator: Simulator, credentials: KlingCredentials
) -> None:
    async with create_kling_pool() as http:
        with anyio.fail_after(10), pytest.raises(KlingError) as caught:
            await KlingClient(http, simulator.url).create_image_task(credentials, BODY)

    assert (caught.value.http_status, caught.value.code) == (401, 1002)
    assert caught.value.request_id
    assert error_from_kling(caught.value).type == "kling_auth_failed"
    assert (await simulator.stats())["creates"] == 0


async def test_an_expired_token_on_a_query_is_signed_again_once_and_the_query_succeeds(simulator: Simulator) -> None:
    async with create_kling_pool() as http:
        client = KlingClient(http, simulator.url)
        with anyio.fail_after(10):
            created = await client.create_image_task(CREDENTIALS, BODY)
            await simulator.control("faults", {"code": 1004, "path": "query", "times": 1})
            queried = await client.get_image_task(CREDENTIALS, created.task_id)

    assert queried.task_id == created.task_id
    assert (await simulator.stats())["queries"] == 2


async def test_an_expired_token_on_a_create_is_signed_again_once_and_creates_one_task(simulator: Simulator) -> None:
    await simulator.control("faults", {"code": 1004, "path": "create", "times": 1})

    async with create_kling_pool() as http:
        with anyio.fail_after(10):
            task = await KlingClient(http, simulator.url).create_image_task(CREDENTIALS, BODY)

    assert task.task_status == "submitted"
    assert (await simulator.stats())["creates"] == 1


async def test_an_invalid_token_error_is_not_retried(simulator: Simulator) -> None:
    await simulator.control("faults", {"code": 1002, "path": "create", "times": 1})

    async with create_kling_pool() as http:
        with anyio.fail_after(10), pytest.raises(KlingError) as caught:
            await KlingClient(http, simulator.url).create_image_task(CREDENTIALS, BODY)

    assert caught.value.code == 1002
    assert (await simulator.stats())["creates"] == 0


# --- JwtCache ---


def test_the_same_token_is_reused_for_the_same_credentials_within_its_lifetime() -> None:
    cache = JwtCache()
    assert cache.token(CREDENTIALS) == cache.token(KlingCredentials(PRIMARY.access_key, PRIMARY.secret_key))


def test_a_different_secret_for_the_same_access_key_gets_a_different_token() -> None:
    cache = JwtCache()
    first = cache.token(CREDENTIALS)
    rotated = KlingCredentials(PRIMARY.access_key, "sk-rotated-" + "0123456789abcdef" * 3)
    second = cache.token(rotated)

    assert second != first
    assert jwt.decode(second, rotated.secret_key, algorithms=["HS256"])["iss"] == PRIMARY.access_key
    assert cache.token(CREDENTIALS) == first


def test_different_access_keys_get_tokens_naming_their_own_issuer() -> None:
    cache = JwtCache()
    primary = jwt.decode(cache.token(CREDENTIALS), PRIMARY.secret_key, algorithms=["HS256"])
    secondary = jwt.decode(cache.token(OTHER_CREDENTIALS), SECONDARY.secret_key, algorithms=["HS256"])
    assert (primary["iss"], secondary["iss"]) == (PRIMARY.access_key, SECONDARY.access_key)


def test_a_token_is_hs256_with_iss_exp_in_30_minutes_and_nbf_5_seconds_ago() -> None:
    now = time.time()
    token = JwtCache().token(CREDENTIALS)

    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    payload = jwt.decode(token, PRIMARY.secret_key, algorithms=["HS256"], options={"require": ["exp", "nbf", "iss"]})
    assert set(payload) == {"iss", "exp", "nbf"}
    assert payload["iss"] == PRIMARY.access_key
    assert abs(payload["exp"] - (now + 1800)) <= 5
    assert abs(payload["nbf"] - (now - 5)) <= 5


def test_credentials_repr_hides_the_secret_key() -> None:
    assert PRIMARY.secret_key not in repr(CREDENTIALS)
    assert PRIMARY.access_key in repr(CREDENTIALS)


# --- answers that are not Kling's envelope, and no answer at all ---


@pytest.mark.parametrize("path", ["create", "query"])
async def test_a_malformed_answer_raises_a_protocol_error_that_the_caller_sees_as_502(
    simulator: Simulator, path: str
) -> None:
    await simulator.control("malformed", {"path": path})

    async with create_kling_pool() as http:
        client = KlingClient(http, simulator.url)
        with anyio.fail_after(10), pytest.raises(KlingProtocolError) as caught:
            await call(client, path)

    error = error_from_kling(caught.value)
    assert (error.status, error.type) == (502, "upstream_unavailable")


async def test_an_unknown_path_answers_an_envelope_less_404_that_raises_a_protocol_error(simulator: Simulator) -> None:
    async with create_kling_pool() as http:
        client = KlingClient(http, f"{simulator.url}/extra")
        with anyio.fail_after(10):
            with pytest.raises(KlingProtocolError) as on_create:
                await client.create_image_task(CREDENTIALS, BODY)
            with pytest.raises(KlingProtocolError):
                await client.get_image_task(CREDENTIALS, "1234567890")

    assert error_from_kling(on_create.value).status == 502
    assert (await simulator.stats())["creates"] == 0


async def test_an_answer_slower_than_the_deadline_raises_a_timed_out_transport_error_seen_as_504(
    simulator: Simulator,
) -> None:
    await simulator.control("slow", {"seconds": 2, "path": "create"})

    async with create_kling_pool() as http:
        client = KlingClient(http, simulator.url, deadline_s=0.3)
        with anyio.fail_after(1.5), pytest.raises(KlingTransportError) as caught:
            await client.create_image_task(CREDENTIALS, BODY)

    assert caught.value.timed_out is True
    error = error_from_kling(caught.value)
    assert (error.status, error.type) == (504, "upstream_timeout")


async def test_a_refused_connection_raises_a_transport_error_that_did_not_time_out_seen_as_502() -> None:
    async with create_kling_pool() as http:
        client = KlingClient(http, f"http://127.0.0.1:{free_port()}")
        with anyio.fail_after(10), pytest.raises(KlingTransportError) as caught:
            await client.create_image_task(CREDENTIALS, BODY)

    assert caught.value.timed_out is False
    error = error_from_kling(caught.value)
    assert (error.status, error.type) == (502, "upstream_unavailable")


def test_error_from_kling_refuses_an_exception_that_is_not_a_kling_failure() -> None:
    with pytest.raises(TypeError):
        error_from_kling(RuntimeError("not from Kling"))


# --- task lifecycle ---


async def test_a_created_task_reaches_succeed_with_indexed_absolute_image_urls(simulator: Simulator) -> None:
    async with create_kling_pool() as http:
        client = KlingClient(http, simulator.url)
        with anyio.fail_after(10):
            created = await client.create_image_task(CREDENTIALS, {**BODY, "n": 3})
        done = await wait_for_terminal(client, CREDENTIALS, created.task_id)

    assert created.task_status == "submitted"
    assert created.task_result.images == []
    assert (done.task_id, done.task_status) == (created.task_id, "succeed")
    assert done.updated_at >= done.created_at == created.created_at
    assert [image.index for image in done.task_result.images] == [0, 1, 2]
    for image in done.task_result.images:
        assert image.url.startswith(f"{simulator.url}/images/{created.task_id}/")


async def test_a_task_can_be_queried_by_its_external_task_id(simulator: Simulator) -> None:
    external_id = "tenant-1:idem-42"
    async with create_kling_pool() as http:
        client = KlingClient(http, simulator.url)
        with anyio.fail_after(10):
            created = await client.create_image_task(CREDENTIALS, {**BODY, "external_task_id": external_id})
            found = await client.get_image_task(CREDENTIALS, external_id)

    assert created.task_info.external_task_id == external_id
    assert found.task_id == created.task_id
    assert found.task_info.external_task_id == external_id


async def test_a_task_of_another_account_is_not_found(simulator: Simulator) -> None:
    async with create_kling_pool() as http:
        client = KlingClient(http, simulator.url)
        with anyio.fail_after(10):
            created = await client.create_image_task(CREDENTIALS, BODY)
            with pytest.raises(KlingError) as caught:
                await client.get_image_task(OTHER_CREDENTIALS, created.task_id)

    assert (caught.value.http_status, caught.value.code) == (404, 1203)


async def test_a_task_kling_fails_after_creation_reports_failed_with_its_reason(simulator: Simulator) -> None:
    await simulator.control("outcomes", {"status": "failed", "message": "content risk control"})

    async with create_kling_pool() as http:
        client = KlingClient(http, simulator.url)
        with anyio.fail_after(10):
            created = await client.create_image_task(CREDENTIALS, BODY)
        done = await wait_for_terminal(client, CREDENTIALS, created.task_id)

    assert (done.task_status, done.task_status_msg) == ("failed", "content risk control")
    assert done.task_result.images == []


# --- build_generation_body: the tool's arguments mapped onto Kling's fields ---

# (GenerateRequest arguments, fields the body must hold, fields the body must not hold)
BODY_CASES: list[tuple[str, dict[str, Any], dict[str, Any], set[str]]] = [
    (
        "defaults",
        {"prompt": "a fox"},
        {"model_name": "kling-v3", "prompt": "a fox", "n": 1, "aspect_ratio": "16:9"},
        {"negative_prompt", "image", "image_fidelity", "image_reference", "human_fidelity", "resolution"},
    ),
    ("num-images-is-n", {"prompt": "a fox", "num_images": 4}, {"n": 4}, set()),
    ("negative-prompt-kept", {"prompt": "a fox", "negative_prompt": "blur"}, {"negative_prompt": "blur"}, set()),
    ("empty-negative-prompt-omitted", {"prompt": "a fox", "negative_prompt": ""}, {}, {"negative_prompt"}),
    (
        "kling-v1-weight-is-image-fidelity",
        {"prompt": "a fox", "model_name": "kling-v1", "ref_image_url": PNG, "ref_image_weight": 0.7},
        {"model_name": "kling-v1", "image": PNG, "image_fidelity": 0.7},
        {"negative_prompt"},
    ),
    (
        "zero-weight-is-kept",
        {"prompt": "a fox", "model_name": "kling-v1", "ref_image_url": PNG, "ref_image_weight": 0.0},
        {"image_fidelity": 0.0},
        set(),
    ),
    (
        "dotted-kling-v1.5-with-subject",
        {
            "prompt": "a fox",
            "model_name": "kling-v1.5",
            "ref_image_url": PNG,
            "ref_image_weight": 0.2,
            "image_reference": "subject",
            "human_fidelity": 0.6,
        },
        {
            "model_name": "kling-v1-5",
            "image": PNG,
            "image_fidelity": 0.2,
            "image_reference": "subject",
            "human_fidelity": 0.6,
        },
        set(),
    ),
    (
        "dotted-kling-v2.1",
        {"prompt": "a fox", "model_name": "kling-v2.1", "ref_image_url": PNG, "ref_image_weight": 0.4},
        {"model_name": "kling-v2-1", "image": PNG, "image_fidelity": 0.4},
        set(),
    ),
    (
        "kling-v2-ignores-weight",
        {"prompt": "a fox", "model_name": "kling-v2", "ref_image_url": PNG, "ref_image_weight": 0.4},
        {"model_name": "kling-v2", "image": PNG},
        {"image_fidelity"},
    ),
    (
        "kling-v2-new-ignores-weight",
        {"prompt": "restyle", "model_name": "kling-v2-new", "ref_image_url": PNG, "ref_image_weight": 0.4},
        {"model_name": "kling-v2-new", "image": PNG},
        {"image_fidelity"},
    ),
    (
        "kling-v3-ignores-weight",
        {"prompt": "a fox", "ref_image_url": PNG, "ref_image_weight": 0.4},
        {"model_name": "kling-v3", "image": PNG},
        {"image_fidelity"},
    ),
    (
        "kling-v2-master-is-kling-v2",
        {"prompt": "a fox", "model_name": "kling-v2-master"},
        {"model_name": "kling-v2"},
        set(),
    ),
    (
        "data-uri-prefix-stripped",
        {"prompt": "a fox", "model_name": "kling-v2-1", "ref_image_url": f"data:image/png;base64,{PNG}"},
        {"image": PNG},
        set(),
    ),
    (
        "https-url-image",
        {"prompt": "a fox", "ref_image_url": "https://example.com/fox.png", "image_reference": "face"},
        {"image": "https://example.com/fox.png", "image_reference": "face"},
        set(),
    ),
    (
        "wide-2k",
        {"prompt": "a fox", "model_name": "kling-v2", "aspect_ratio": "21:9", "resolution": "2k"},
        {"aspect_ratio": "21:9", "resolution": "2k"},
        set(),
    ),
]


@pytest.mark.parametrize(
    ("arguments", "present", "absent"), [case[1:] for case in BODY_CASES], ids=[case[0] for case in BODY_CASES]
)
async def test_a_generation_body_uses_klings_field_names_and_is_accepted_by_kling(
    simulator: Simulator, arguments: dict[str, Any], present: dict[str, Any], absent: set[str]
) -> None:
    body = build_generation_body(GenerateRequest.model_validate(arguments))

    assert {key: body.get(key) for key in present} == present
    assert absent.isdisjoint(body)
    assert set(SEED_FIELD_NAMES).isdisjoint(body)
    async with create_kling_pool() as http:
        with anyio.fail_after(10):
            task = await KlingClient(http, simulator.url).create_image_task(CREDENTIALS, body)
    assert task.task_status == "submitted"


def test_external_task_id_and_callback_url_are_passed_through_only_when_given() -> None:
    request = GenerateRequest(prompt="a fox")
    body = build_generation_body(request, external_task_id="ext-1", callback_url="https://example.com/hook")

    assert (body["external_task_id"], body["callback_url"]) == ("ext-1", "https://example.com/hook")
    assert {"external_task_id", "callback_url"}.isdisjoint(build_generation_body(request))
