"""Two gateway replicas (`kling-gateway serve` processes) behind a real nginx configured by
deploy/nginx's template: generations over REST and MCP through the proxy, spread over both replicas.

A SIGTERM to a replica during a wait is covered for a replica reached directly by
tests/test_resilience.py::test_sigterm_during_a_wait_answers_the_caller_with_its_task_id; here the same
through the proxy.
"""

from __future__ import annotations

import re
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack

import anyio
import httpx2
import pytest

from tests.conftest import RunningGateway, Simulator, bearer, mcp_client, replica_env
from tests.servers import Replica, gateway_process, nginx_proxy

pytestmark = pytest.mark.anyio


def counted(metrics: str, method: str, route: str, status: str) -> float:
    labels = f'method="{method}",route="{route}",status="{status}"'
    found = re.search(rf"^kgw_http_requests_total\{{{re.escape(labels)}\}} (\S+)$", metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.fixture
async def replicas(simulator: Simulator, redis_url: str) -> AsyncIterator[list[Replica]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(gateway_process(replica_env(redis_url, simulator.url)))
               for _ in range(2)]  # fmt: skip


@pytest.fixture
def proxy(replicas: list[Replica]) -> Iterator[str]:
    with nginx_proxy([replica.url.removeprefix("http://") for replica in replicas]) as url:
        yield url


@pytest.mark.sim_delay(0.5)
async def test_generations_over_rest_and_mcp_through_nginx_succeed_on_both_replicas(
    redis_gateway: RunningGateway, replicas: list[Replica], proxy: str
) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    reports: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append(progress)

    async with httpx2.AsyncClient(timeout=30) as http:
        with anyio.fail_after(60):
            for index in range(4):
                headers = bearer(api_key) | {"X-Request-ID": f"via-proxy-{index}"}
                body = {"prompt": f"fox {index}", "wait_seconds": 20}
                response = await http.post(f"{proxy}/generate", json=body, headers=headers)
                assert response.status_code == 200, response.text
                assert response.json()["status"] == "succeeded"
                assert response.headers["x-request-id"] == f"via-proxy-{index}"
            untagged = await http.get(f"{proxy}/tasks/{response.json()['task_id']}", headers=bearer(api_key))
            assert re.fullmatch(r"[0-9a-f]{32}", untagged.headers["x-request-id"])  # nginx's own $request_id
            for mode in ("legacy", "auto"):
                async with mcp_client(proxy, api_key, mode) as client:
                    result = await client.call_tool("generate_image", {"prompt": "owl", "wait_seconds": 20},
                                                    progress_callback=on_progress)  # fmt: skip
                assert not result.is_error
                assert isinstance(result.structured_content, dict)
                assert result.structured_content["status"] == "succeeded"
        assert reports, "progress notifications did not come through the proxy"
        scraped = [(await http.get(f"{replica.url}/metrics")).text for replica in replicas]
    for metrics in scraped:
        assert counted(metrics, "POST", "/generate", "200") >= 1
        assert counted(metrics, "POST", "/mcp", "200") >= 1
    assert sum(counted(metrics, "POST", "/generate", "200") for metrics in scraped) == 4
    # /metrics is each replica's own: the proxy does not serve it.
    async with httpx2.AsyncClient(timeout=10) as http:
        assert (await http.get(f"{proxy}/metrics")).status_code == 404


@pytest.mark.sim_delay(60.0)
async def test_sigterm_to_the_replica_holding_a_wait_answers_through_the_proxy_with_the_task_id(
    redis_gateway: RunningGateway, replicas: list[Replica], proxy: str
) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    answers: list[httpx2.Response] = []
    async with httpx2.AsyncClient(timeout=30) as http:

        async def creates(replica: Replica) -> float:
            metrics = (await http.get(f"{replica.url}/metrics")).text
            found = re.search(r'^kgw_kling_requests_total\{code="0",endpoint="create"\} (\S+)$', metrics, re.MULTILINE)
            return float(found.group(1)) if found else 0.0

        async def waiting_call() -> None:
            body = {"prompt": "x", "wait_seconds": 50}
            answers.append(await http.post(f"{proxy}/generate", json=body, headers=bearer(api_key)))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                group.start_soon(waiting_call)
                # The replica that created the task is the one holding the wait. Its metric counts the create
                # once Kling's answer is read, a moment after the simulator counted it: ask the replicas.
                while not (holders := [replica for replica in replicas if await creates(replica) == 1]):  # noqa: ASYNC110 - metrics are the observation
                    await anyio.sleep(0.05)
                [holder] = holders
                holder.process.send_signal(signal.SIGTERM)
            assert await holder.process.wait() in (0, -signal.SIGTERM)
    [answer] = answers
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] in ("submitted", "processing")
    assert answer.json()["task_id"]
