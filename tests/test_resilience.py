"""Upstream resilience: which Kling failures are retried, how, and that a retry never pays twice."""

from __future__ import annotations

import contextlib
import io
import json
import signal
from collections.abc import AsyncIterator, Awaitable

import anyio
import httpx2
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from app.breaker import Breakers
from app.http_pool import create_kling_pool
from app.images import retry_delay
from app.kling import (
    KlingCircuitOpen,
    KlingClient,
    KlingCredentials,
    KlingError,
    KlingTransportError,
)
from app.logs import REQUEST_LOGGER
from app.sealing import new_master_key
from tests.conftest import (
    ADMIN,
    PRIMARY,
    RunningGateway,
    Simulator,
    bearer,
    gateway_settings,
    replica_env,
    running_gateway,
)
from tests.servers import free_port, gateway_process

pytestmark = pytest.mark.anyio


@pytest.fixture
async def quick_gateway(simulator: Simulator) -> AsyncIterator[RunningGateway]:
    """A gateway whose submissions give up after 3 s, so failing retries end quickly."""
    async with running_gateway(gateway_settings(simulator, queue_timeout_seconds=3)) as running:
        yield running


async def test_two_5000s_then_success_make_one_task_in_three_attempts(
    quick_gateway: RunningGateway, simulator: Simulator
) -> None:
    await simulator.control("faults", {"code": 5000, "http_status": 500, "times": 2, "path": "create"})
    api_key = await quick_gateway.new_api_key("acme")
    with anyio.fail_after(20):
        response = await quick_gateway.http.post(f"{quick_gateway.url}/generate", json={"prompt": "x"},
                                                 headers=bearer(api_key))  # fmt: skip
    assert response.status_code == 202, response.text
    stats = await simulator.stats()
    assert (stats["create_attempts"], stats["creates"]) == (3, 1)


@pytest.mark.parametrize(
    ("code", "http_status", "status", "kind"),
    [
        (1102, 429, 403, "kling_account_unavailable"),
        (1101, 429, 403, "kling_account_unavailable"),
        (1103, 403, 403, "kling_forbidden"),
        (1301, 400, 422, "content_policy"),
        (1201, 400, 422, "kling_invalid_request"),
        (1002, 401, 502, "kling_auth_failed"),
        (1304, 429, 403, "kling_ip_not_allowed"),
    ],
)
async def test_account_billing_permission_and_policy_failures_are_tried_once_and_explained(
    quick_gateway: RunningGateway, simulator: Simulator, code: int, http_status: int, status: int, kind: str
) -> None:
    await simulator.control("faults", {"code": code, "http_status": http_status, "times": 5, "path": "create"})
    api_key = await quick_gateway.new_api_key("acme")
    response = await quick_gateway.http.post(f"{quick_gateway.url}/generate", json={"prompt": "x"},
                                             headers=bearer(api_key))  # fmt: skip
    assert (response.status_code, response.json()["error"]["type"]) == (status, kind)
    assert response.json()["error"]["kling_code"] == code
    assert (await simulator.stats())["create_attempts"] == 1


async def test_kling_down_for_longer_than_the_deadline_is_503_after_bounded_retries(
    quick_gateway: RunningGateway, simulator: Simulator
) -> None:
    await simulator.control("faults", {"code": 5001, "http_status": 503, "times": 100, "path": "create"})
    api_key = await quick_gateway.new_api_key("acme")
    with anyio.fail_after(10):
        response = await quick_gateway.http.post(f"{quick_gateway.url}/generate", json={"prompt": "x"},
                                                 headers=bearer(api_key))  # fmt: skip
    assert response.status_code == 503
    assert "retry-after" in response.headers
    stats = await simulator.stats()
    assert stats["creates"] == 0
    attempts = stats["create_attempts"]
    assert isinstance(attempts, int)
    assert 2 <= attempts <= 12


async def test_an_unreachable_kling_is_retried_then_reported_as_502(redis_gateway: RunningGateway) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    closed_port = free_port()
    settings = redis_gateway.gateway.settings.model_copy(
        # A breaker that cannot trip here, so the answer is the connection failure's, not the open circuit's.
        update={
            "kling_base_url": f"http://127.0.0.1:{closed_port}",
            "queue_timeout_seconds": 2,
            "breaker_failures": 1000,
        }
    )
    async with running_gateway(settings) as unreachable:  # another replica, same tenants, Kling unreachable
        with anyio.fail_after(10):
            response = await unreachable.http.post(
                f"{unreachable.url}/generate", json={"prompt": "x"}, headers=bearer(api_key)
            )
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_unavailable"


async def test_a_replica_with_the_wrong_master_key_answers_503_not_500(redis_gateway: RunningGateway) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    settings = redis_gateway.gateway.settings.model_copy(update={"master_key": SecretStr(new_master_key())})
    async with running_gateway(settings) as mistaken:
        response = await mistaken.http.post(f"{mistaken.url}/generate", json={"prompt": "x"}, headers=bearer(api_key))
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "credentials_unavailable"


def test_retry_delays_follow_the_policy() -> None:
    busy = KlingError(429, 1303, "parallel task over resource pack limit", "r")
    assert all(1.0 <= (retry_delay(busy, attempt) or 0) <= 8.0 for attempt in range(10))
    told = KlingError(429, 1302, "too fast", "r", retry_after=6.0)
    assert retry_delay(told, 0) == 6.0
    for never in (1000, 1102, 1201, 1301, 1304):
        assert retry_delay(KlingError(400, never, "no", "r"), 0) is None
    assert retry_delay(KlingTransportError("no connection", timed_out=False, sent=False), 3) is not None
    assert retry_delay(KlingTransportError("read timeout", timed_out=True, sent=True), 0) is None
    # A connection dropped without an answer (a kept-alive connection the server had just closed): retried
    # only once a look-up by external_task_id found no task; after a timeout the create may still be under way.
    dropped = KlingTransportError("server disconnected", timed_out=False, sent=True)
    assert retry_delay(dropped, 0) is None
    assert retry_delay(dropped, 0, known_absent=True) is not None
    assert retry_delay(KlingTransportError("read timeout", timed_out=True, sent=True), 0, known_absent=True) is None


async def test_six_simultaneous_submits_with_one_key_over_two_replicas_make_one_task(
    redis_gateway: RunningGateway, simulator: Simulator, redis_url: str
) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    headers = bearer(api_key) | {"Idempotency-Key": "order-7"}
    async with gateway_process(replica_env(redis_url, simulator.url)) as other:
        task_ids: list[str] = []

        async def submit(index: int) -> None:
            url = (redis_gateway.url, other.url)[index % 2]
            response = await redis_gateway.http.post(f"{url}/generate", json={"prompt": "x"}, headers=headers)
            assert response.status_code == 202, response.text
            task_ids.append(response.json()["task_id"])

        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                for index in range(6):
                    group.start_soon(submit, index)
    assert len(set(task_ids)) == 1
    assert (await simulator.stats())["creates"] == 1


@pytest.mark.sim_delay(60.0)
async def test_sigterm_during_a_wait_answers_the_caller_with_its_task_id(
    redis_gateway: RunningGateway, simulator: Simulator, redis_url: str
) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    async with gateway_process(replica_env(redis_url, simulator.url)) as replica:
        answers: list[httpx2.Response] = []

        async def waiting_call() -> None:
            body = {"prompt": "x", "wait_seconds": 50}
            answers.append(await redis_gateway.http.post(f"{replica.url}/generate", json=body, headers=bearer(api_key)))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                group.start_soon(waiting_call)
                while (await simulator.stats())["creates"] != 1:  # noqa: ASYNC110 - the simulator is the observation
                    await anyio.sleep(0.05)
                replica.process.send_signal(signal.SIGTERM)
            # uvicorn re-raises the signal once it has shut down gracefully: exiting "by SIGTERM" is the norm.
            assert await replica.process.wait() in (0, -signal.SIGTERM)
    [answer] = answers
    assert answer.status_code == 202
    assert answer.json()["status"] in ("submitted", "processing")
    assert answer.json()["task_id"]


async def test_a_failing_kling_account_trips_its_breaker_then_recovers_after_a_probe(simulator: Simulator) -> None:
    await simulator.control("faults", {"code": 5001, "http_status": 503, "times": 1000, "path": "create"})
    settings = gateway_settings(simulator, breaker_failures=3, breaker_open_seconds=1, queue_timeout_seconds=5)
    async with running_gateway(settings) as running:
        url, http = running.url, running.http
        headers = bearer(await running.new_api_key("acme"))
        with anyio.fail_after(15):
            tripped = await http.post(f"{url}/generate", json={"prompt": "x"}, headers=headers)
            attempts = (await simulator.stats())["create_attempts"]
            fast = await http.post(f"{url}/generate", json={"prompt": "x"}, headers=headers)
        assert tripped.status_code == fast.status_code == 503
        assert fast.json()["error"]["circuit"] == "open"
        assert (await simulator.stats())["create_attempts"] == attempts == 3  # the open breaker sent nothing

        await simulator.control("reset", {})  # Kling is healthy again
        with anyio.fail_after(10):
            # The breaker's pause has no event to await; asking again is the observation.
            while (await http.post(f"{url}/generate", json={"prompt": "x"}, headers=headers)).status_code != 202:  # noqa: ASYNC110
                await anyio.sleep(0.2)
        assert (await http.post(f"{url}/generate", json={"prompt": "x"}, headers=headers)).status_code == 202


async def test_a_retry_after_a_lost_create_answer_looks_the_task_up_instead_of_creating_again(
    simulator: Simulator,
) -> None:
    settings = gateway_settings(simulator, kling_timeout_seconds=0.5, queue_timeout_seconds=1)
    async with running_gateway(settings) as running:
        url, http = running.url, running.http
        headers = bearer(await running.new_api_key("acme")) | {"Idempotency-Key": "order-9"}
        # The create's answer is lost (too slow) and the lookup that follows fails too.
        await simulator.control("slow", {"seconds": 1.5, "times": 1, "path": "create"})
        await simulator.control("faults", {"code": 5001, "http_status": 503, "times": 1, "path": "query"})
        with anyio.fail_after(20):
            lost = await http.post(f"{url}/generate", json={"prompt": "x"}, headers=headers)
            retried = await http.post(f"{url}/generate", json={"prompt": "x"}, headers=headers)
    assert lost.status_code >= 500
    assert retried.status_code in (200, 202), retried.text
    stats = await simulator.stats()
    assert (stats["creates"], stats["create_attempts"]) == (1, 1)


@pytest.mark.sim_delay(60.0)
async def test_a_caller_hanging_up_mid_create_still_gets_the_task_recorded_and_its_slots_held(
    redis_gateway: RunningGateway, simulator: Simulator, redis: Redis, log_lines: io.StringIO
) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    tenant_id = (await redis_gateway.http.get(f"{redis_gateway.url}/admin/tenants", headers=ADMIN)).json()[0]["id"]
    await simulator.control("slow", {"seconds": 1.0, "times": 1, "path": "create"})
    headers = bearer(api_key) | {"X-Request-ID": "hung-up-caller"}
    async with httpx2.AsyncClient(timeout=0.3) as impatient:
        with pytest.raises(httpx2.ReadTimeout):
            await impatient.post(f"{redis_gateway.url}/generate", json={"prompt": "x"}, headers=headers)
    leases = f"kgw:rl:{{t:{tenant_id}}}:leases"
    with anyio.fail_after(5):
        # The request's own log line is written last, once its handling has fully unwound (slots kept or
        # freed); other lines logged while it ran carry its request id too.
        while not request_logged(log_lines, "hung-up-caller"):  # noqa: ASYNC110 - the log is the observation
            await anyio.sleep(0.05)
    records = await redis.keys("kgw:task:*")
    assert len(records) == 1
    assert (await simulator.stats())["creates"] == 1
    assert await redis.zcard(leases) == 1  # the running task keeps its slot: no free task by hanging up


@pytest.mark.sim_delay(60.0)
async def test_a_caller_hanging_up_mid_create_with_an_idempotency_key_can_retry_it_at_once(
    redis_gateway: RunningGateway, simulator: Simulator, log_lines: io.StringIO
) -> None:
    """The hang-up lands as the shielded create ends: the key must still name the task, or every retry would wait
    and then be refused (409) until the claim lapsed."""
    api_key = await redis_gateway.new_api_key("acme")
    await simulator.control("slow", {"seconds": 1.0, "times": 1, "path": "create"})
    headers = bearer(api_key) | {"Idempotency-Key": "order-77", "X-Request-ID": "hung-up-keyed"}
    async with httpx2.AsyncClient(timeout=0.3) as impatient:
        with pytest.raises(httpx2.ReadTimeout):
            await impatient.post(f"{redis_gateway.url}/generate", json={"prompt": "x"}, headers=headers)
    with anyio.fail_after(5):
        while not request_logged(log_lines, "hung-up-keyed"):  # noqa: ASYNC110 - the log is the observation
            await anyio.sleep(0.05)
        retried = await redis_gateway.http.post(f"{redis_gateway.url}/generate", json={"prompt": "x"},
                                                headers=headers | {"X-Request-ID": "retry"})  # fmt: skip
    assert retried.status_code in (200, 202), retried.text
    assert (await simulator.stats())["creates"] == 1


def request_logged(log_lines: io.StringIO, request_id: str) -> bool:
    """Whether the request line of `request_id` (the one line per request, written when it ends) is out."""
    lines = (json.loads(line) for line in log_lines.getvalue().splitlines())
    return any(line.get("request_id") == request_id and line["logger"] == REQUEST_LOGGER for line in lines)


async def test_calls_that_found_every_pooled_connection_busy_do_not_open_the_accounts_breaker(
    simulator: Simulator,
) -> None:
    breakers = Breakers(failure_threshold=1, open_s=60)
    credentials = KlingCredentials(PRIMARY.access_key, PRIMARY.secret_key)
    async with create_kling_pool(max_connections=1) as http:
        client = KlingClient(http, simulator.url, breakers=breakers)
        await simulator.control("slow", {"seconds": 3.0, "times": 1, "path": "query"})
        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(client.get_image_task, credentials, "1")  # holds the one connection for 3 s
                while (await simulator.stats())["queries"] == 0:  # noqa: ASYNC110 - a counter is all there is
                    await anyio.sleep(0.01)
                with pytest.raises(KlingTransportError) as congested:
                    await client.get_image_task(credentials, "1")  # the pool's 2 s timeout passes first
                group.cancel_scope.cancel()
            with pytest.raises(KlingError) as answered:
                await client.get_image_task(credentials, "1")  # let through: the breaker did not open
    assert congested.value.congested
    assert answered.value.code == 1203


async def test_a_probe_that_found_the_pool_full_leaves_an_open_breaker_open(simulator: Simulator) -> None:
    breakers = Breakers(failure_threshold=1, open_s=0.2)  # one account's breaker, shared by two pools here
    credentials = KlingCredentials(PRIMARY.access_key, PRIMARY.secret_key)
    async with create_kling_pool(max_connections=1) as narrow_pool, create_kling_pool() as wide_pool:
        narrow = KlingClient(narrow_pool, simulator.url, breakers=breakers)
        wide = KlingClient(wide_pool, simulator.url, breakers=breakers)
        await simulator.control("slow", {"seconds": 5.0, "times": 1, "path": "query"})
        with anyio.fail_after(15):
            async with anyio.create_task_group() as group:
                group.start_soon(_answer_ignored, narrow.get_image_task(credentials, "1"))  # holds its one connection
                await _queries_reach(simulator, 1)
                await simulator.control("faults", {"code": 5001, "http_status": 503, "times": 1, "path": "query"})
                with pytest.raises(KlingError):
                    await wide.get_image_task(credentials, "1")  # opens the breaker
                await anyio.sleep(0.25)  # the breaker's pause: a fixed time, nothing to await
                with pytest.raises(KlingTransportError):
                    await narrow.get_image_task(credentials, "1")  # the probe, stuck in the full pool
                await simulator.control("slow", {"seconds": 1.0, "times": 1, "path": "query"})
                group.start_soon(_answer_ignored, wide.get_image_task(credentials, "1"))  # the next probe
                await _queries_reach(simulator, 3)
                with pytest.raises(KlingCircuitOpen):
                    await wide.get_image_task(credentials, "1")  # still open: one probe at a time
                group.cancel_scope.cancel()


async def _answer_ignored(call: Awaitable[object]) -> None:
    with contextlib.suppress(KlingError):
        await call


async def _queries_reach(simulator: Simulator, count: int) -> None:
    while int(str((await simulator.stats())["queries"])) < count:  # noqa: ASYNC110 - a counter is all there is
        await anyio.sleep(0.01)


async def test_a_cancelled_breaker_probe_lets_the_next_call_probe(simulator: Simulator) -> None:
    breakers = Breakers(failure_threshold=1, open_s=0.2)
    credentials = KlingCredentials(PRIMARY.access_key, PRIMARY.secret_key)
    async with create_kling_pool() as http:
        client = KlingClient(http, simulator.url, breakers=breakers)
        await simulator.control("faults", {"code": 5001, "http_status": 503, "times": 1, "path": "query"})
        with pytest.raises(KlingError):
            await client.get_image_task(credentials, "1")
        with pytest.raises(KlingCircuitOpen):
            await client.get_image_task(credentials, "1")
        await anyio.sleep(0.25)  # the breaker's pause: a fixed time, nothing to await
        await simulator.control("slow", {"seconds": 2.0, "times": 1, "path": "query"})
        with anyio.move_on_after(0.2):
            await client.get_image_task(credentials, "1")  # the probe, abandoned by its caller
        with pytest.raises(KlingError) as caught:
            await client.get_image_task(credentials, "1")  # allowed through as the next probe
    assert caught.value.code == 1203
