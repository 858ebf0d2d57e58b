"""The deprecated HTTP+SSE transport (`GET /sse`, `POST /messages/`) for old MCP clients, through the
SDK's SSE client and raw HTTP: the same keys, tenants and Host checks as `/mcp`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.types import ResourceLink

from tests.conftest import RunningGateway, bearer, text_of

pytestmark = pytest.mark.anyio
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}


@asynccontextmanager
async def sse_session(gateway: RunningGateway, api_key: str) -> AsyncIterator[tuple[str, AsyncIterator[str]]]:
    """Open `GET /sse` by hand; yield the message URL it announces and the stream's remaining lines."""
    headers = bearer(api_key) | {"Accept": "text/event-stream"}
    async with (
        httpx2.AsyncClient(timeout=httpx2.Timeout(10, read=30)) as http,
        http.stream("GET", f"{gateway.url}/sse", headers=headers) as response,
    ):
        assert response.status_code == 200
        lines = response.aiter_lines()
        with anyio.fail_after(10):
            async for line in lines:
                if line.startswith("data: "):
                    yield gateway.url + line.removeprefix("data: "), lines
                    return
        raise AssertionError("the stream announced no message endpoint")


async def next_message(lines: AsyncIterator[str]) -> dict[str, object]:
    with anyio.fail_after(10):
        async for line in lines:
            if line.startswith("data: "):
                message: dict[str, object] = json.loads(line.removeprefix("data: "))
                return message
    raise AssertionError("the stream ended")


async def test_the_sdk_sse_client_lists_tools_and_generates_an_image_with_progress(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("acme")
    reports: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append(message)

    async with Client(sse_client(f"{gateway.url}/sse", headers=bearer(api_key))) as client:
        with anyio.fail_after(30):
            tools = {tool.name for tool in (await client.list_tools()).tools}
            result = await client.call_tool(
                "generate_image", {"prompt": "a lighthouse", "num_images": 2}, progress_callback=on_progress
            )
    assert {"generate_image", "check_image_status"} <= tools
    assert not result.is_error, text_of(result)
    assert len([block for block in result.content if isinstance(block, ResourceLink)]) == 2
    assert isinstance(result.structured_content, dict)
    assert result.structured_content["status"] == "succeeded"
    assert reports, "no progress notification arrived"


async def test_a_task_started_over_sse_belongs_to_the_callers_tenant(gateway: RunningGateway) -> None:
    acme, globex = await gateway.new_api_key("acme"), await gateway.new_api_key("globex")
    async with Client(sse_client(f"{gateway.url}/sse", headers=bearer(acme))) as client:
        with anyio.fail_after(30):
            result = await client.call_tool("generate_image", {"prompt": "a fox", "wait_seconds": 0})
    assert isinstance(result.structured_content, dict)
    task_url = f"{gateway.url}/tasks/{result.structured_content['task_id']}"
    assert (await gateway.http.get(task_url, headers=bearer(acme))).status_code == 200
    assert (await gateway.http.get(task_url, headers=bearer(globex))).status_code == 404


@pytest.mark.parametrize("authorization", [None, "Bearer nonsense"])
async def test_sse_without_a_valid_key_gets_401(gateway: RunningGateway, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    opened = await gateway.http.get(f"{gateway.url}/sse", headers=headers)
    assert opened.status_code == 401
    assert opened.headers["www-authenticate"].startswith("Bearer")
    posted = await gateway.http.post(f"{gateway.url}/messages/?session_id={'0' * 32}", json=INITIALIZE, headers=headers)
    assert posted.status_code == 401


async def test_another_tenant_or_no_key_cannot_post_to_a_session(gateway: RunningGateway) -> None:
    acme, globex = await gateway.new_api_key("acme"), await gateway.new_api_key("globex")
    async with sse_session(gateway, acme) as (message_url, lines):
        foreign = await gateway.http.post(message_url, json=INITIALIZE, headers=bearer(globex))
        assert foreign.status_code == 404  # as if the session did not exist
        assert (await gateway.http.post(message_url, json=INITIALIZE)).status_code == 401

        owned = await gateway.http.post(message_url, json=INITIALIZE, headers=bearer(acme))
        assert owned.status_code == 202
        answer = await next_message(lines)
    assert answer["id"] == 1
    assert "result" in answer  # the owner's own message, and only it, reached the session


async def test_a_session_refuses_another_key_of_the_same_tenant(gateway: RunningGateway) -> None:
    first = await gateway.new_api_key("acme")
    tenant = await gateway.gateway.directory.store.find_tenant("acme")
    assert tenant is not None
    second = (await gateway.gateway.directory.issue_key(tenant.id, "second", None)).api_key
    async with sse_session(gateway, first) as (message_url, _):
        other = await gateway.http.post(message_url, json=INITIALIZE, headers=bearer(second))
    assert other.status_code == 404


async def test_a_foreign_host_header_is_refused_on_sse(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("acme")
    headers = bearer(api_key) | {"Host": "evil.example"}
    assert (await gateway.http.get(f"{gateway.url}/sse", headers=headers)).status_code == 421
