"""generate_image and check_image_status through the official MCP client, over real HTTP, in both eras."""

from __future__ import annotations

import io
from typing import Annotated, Any

import anyio
import httpx2
import pytest
from mcp.types import ResourceLink
from PIL import Image
from pydantic import Field

from app.mcp_server import GatewayMCPServer, declares_param_headers
from tests.conftest import (
    RunningGateway,
    Simulator,
    bearer,
    gateway_settings,
    mcp_client,
    running_gateway,
    structured,
    text_of,
)
from tests.servers import serve

pytestmark = pytest.mark.anyio
ERAS = ["legacy", "auto"]  # 2025-11-25 (initialize handshake) and 2026-07-28 (sessionless)


@pytest.mark.parametrize("mode", ERAS)
async def test_generate_image_reports_progress_and_returns_image_links(gateway: RunningGateway, mode: str) -> None:
    api_key = await gateway.new_api_key("acme")
    reports: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append((progress, message))

    async with mcp_client(gateway, api_key, mode) as client:
        with anyio.fail_after(30):
            result = await client.call_tool(
                "generate_image",
                {"prompt": "a lighthouse at dawn", "num_images": 2, "aspect_ratio": "1:1"},
                progress_callback=on_progress,
            )

    assert not result.is_error, text_of(result)
    links = [block for block in result.content if isinstance(block, ResourceLink)]
    assert len(links) == 2
    content = structured(result)
    assert content["status"] == "succeeded"
    assert [image["index"] for image in content["images"]] == [0, 1]
    assert reports, "no progress notification arrived"
    assert [value for value, _ in reports] == sorted({value for value, _ in reports})
    assert any(message and "generating" in message for _, message in reports)
    png = await gateway.http.get(str(links[0].uri))
    with Image.open(io.BytesIO(png.content)) as image:
        assert image.format == "PNG"
        assert image.width == image.height


@pytest.mark.parametrize("mode", ERAS)
async def test_a_slow_task_returns_its_id_and_check_image_status_finishes_it(
    gateway: RunningGateway, mode: str
) -> None:
    api_key = await gateway.new_api_key("acme")
    async with mcp_client(gateway, api_key, mode) as client:
        started = await client.call_tool("generate_image", {"prompt": "a fox", "wait_seconds": 0})
        assert not started.is_error, text_of(started)
        task_id = structured(started)["task_id"]
        assert structured(started)["status"] in ("submitted", "processing")
        assert "check_image_status" in text_of(started)

        with anyio.fail_after(30):
            finished = await client.call_tool("check_image_status", {"task_id": task_id, "wait_seconds": 20})
    assert structured(finished)["status"] == "succeeded"
    assert len(structured(finished)["images"]) == 1


async def test_tools_publish_the_seed_arguments_and_the_documented_fields(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("acme")
    async with mcp_client(gateway, api_key) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    schema = tools["generate_image"].input_schema["properties"]
    for argument in (
        "prompt",
        "negative_prompt",
        "model_name",
        "aspect_ratio",
        "num_images",
        "ref_image_url",
        "ref_image_weight",
        "image_reference",
        "human_fidelity",
        "resolution",
        "wait_seconds",
        "idempotency_key",
    ):
        assert argument in schema
    assert "ctx" not in schema
    assert set(tools["check_image_status"].input_schema["properties"]) == {"task_id", "wait_seconds", "include_preview"}


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"prompt": "x", "num_images": 12}, "num_images"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 2501}, "prompt"),
        ({"prompt": "x", "aspect_ratio": "5:4"}, "aspect_ratio"),
        ({"prompt": "x", "ref_image_url": "/etc/passwd"}, "ref_image_url"),
        ({"prompt": "x", "ref_image_url": "file:///etc/passwd"}, "ref_image_url"),
        ({"prompt": "x", "ref_image_url": "https://169.254.169.254/latest"}, "ref_image_url"),
        ({"prompt": "x", "ref_image_url": "https://example.com/a.png", "negative_prompt": "blur"}, "negative_prompt"),
        ({"prompt": "x", "ref_image_weight": 1.5}, "ref_image_weight"),
        ({"prompt": "x", "model_name": "kling-v1.6"}, "video model"),
        ({"prompt": "x", "model_name": "kling-v1", "aspect_ratio": "21:9"}, "aspect_ratio"),
    ],
)
async def test_bad_arguments_get_an_error_result_and_nothing_reaches_kling(
    gateway: RunningGateway, simulator: Simulator, arguments: dict[str, Any], named: str
) -> None:
    api_key = await gateway.new_api_key("acme")
    async with mcp_client(gateway, api_key) as client:
        result = await client.call_tool("generate_image", arguments)
    assert result.is_error
    assert named in text_of(result)
    assert (await simulator.stats())["creates"] == 0


async def test_a_task_kling_fails_is_an_error_result_with_the_reason(
    gateway: RunningGateway, simulator: Simulator
) -> None:
    await simulator.control("outcomes", {"status": "failed", "message": "content risk control", "times": 1})
    api_key = await gateway.new_api_key("acme")
    async with mcp_client(gateway, api_key) as client:
        with anyio.fail_after(30):
            result = await client.call_tool("generate_image", {"prompt": "something risky"})
    assert result.is_error
    assert "content risk control" in text_of(result)
    assert structured(result)["status"] == "failed"


async def test_a_depleted_kling_account_is_reported_as_not_retryable(
    gateway: RunningGateway, simulator: Simulator
) -> None:
    await simulator.control(
        "faults", {"code": 1102, "http_status": 429, "message": "resource pack exhausted", "times": 1, "path": "create"}
    )
    api_key = await gateway.new_api_key("acme")
    async with mcp_client(gateway, api_key) as client:
        result = await client.call_tool("generate_image", {"prompt": "a cat"})
    assert result.is_error
    assert structured(result)["error"]["type"] == "kling_account_unavailable"
    assert "retrying will not help" in text_of(result)


@pytest.mark.parametrize("authorization", [None, "Bearer nonsense", "Bearer kgw_AAAAAAAAAAAA_" + "B" * 32])
async def test_mcp_without_a_valid_key_gets_401_with_www_authenticate(
    gateway: RunningGateway, authorization: str | None
) -> None:
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    response = await gateway.http.post(f"{gateway.url}/mcp", json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["type"] == "unauthorized"


async def test_a_foreign_host_header_is_refused_but_loopback_is_served(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("acme")
    headers = bearer(api_key) | {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    rebinding = await gateway.http.post(f"{gateway.url}/mcp", json=body, headers={**headers, "Host": "evil.example"})
    assert rebinding.status_code == 421
    async with mcp_client(gateway, api_key) as client:
        assert (await client.list_tools()).tools


async def test_the_public_hostname_is_served_without_421(simulator: Simulator) -> None:
    async with running_gateway(gateway_settings(simulator, public_url="https://mcp.example.com")) as running:
        url, http = running.url, running.http
        headers = bearer(await running.new_api_key("acme")) | {
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
            "MCP-Protocol-Version": "2025-11-25",
        }
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        }
        for host in ("mcp.example.com", "mcp.example.com:443"):
            response = await http.post(f"{url}/mcp", json=body, headers={**headers, "Host": host})
            assert response.status_code == 200, (host, response.text)
        foreign = await http.post(f"{url}/mcp", json=body, headers={**headers, "Host": "other.example.com"})
        assert foreign.status_code == 421


def modern_tool_call(
    tool: str, arguments: dict[str, Any], **param_headers: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """A raw 2026-07-28 `tools/call` (what the SDK client sends, minus the `Mcp-Param-*` headers it derives from
    the tool's schema): its body and headers, with `param_headers` as `Mcp-Param-<name>`."""
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments, "_meta": meta}}  # fmt: skip
    headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28",
               "Mcp-Method": "tools/call", "Mcp-Name": tool}  # fmt: skip
    return body, headers | {f"Mcp-Param-{name}": value for name, value in param_headers.items()}


async def test_the_gateways_tools_declare_no_param_headers_so_a_stray_one_changes_nothing(
    gateway: RunningGateway, simulator: Simulator
) -> None:
    api_key = await gateway.new_api_key("acme")
    async with mcp_client(gateway, api_key) as client:
        tools = (await client.list_tools()).tools
    assert {tool.name for tool in tools} == {"generate_image", "check_image_status"}
    assert not any(declares_param_headers(tool.input_schema) for tool in tools)
    body, headers = modern_tool_call("generate_image", {"prompt": "a cat", "wait_seconds": 0}, Prompt="a dog")
    response = await gateway.http.post(f"{gateway.url}/mcp", json=body, headers=headers | bearer(api_key))
    assert response.status_code == 200, response.text
    assert '"isError":false' in response.text
    assert (await simulator.stats())["creates"] == 1


async def test_a_tool_that_declares_a_param_header_still_has_it_checked() -> None:
    """The gateway's server skips the SDK's `Mcp-Param-*` check only for tools without `x-mcp-header`."""
    mcp = GatewayMCPServer("headers")

    @mcp.tool()
    def region_of(region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})]) -> str:
        return region

    @mcp.tool()
    def echo(text: str) -> str:
        return text

    # What the SDK's transport asks before each call: a schema to check against only for the annotated tool (should
    # the SDK stop asking through the override, the check would run for every tool again, at its old cost).
    lookup = mcp._lowlevel_server.get_tool_input_schema
    assert lookup is not None
    assert lookup("region_of") is not None
    assert lookup("echo") is None

    app = mcp.streamable_http_app(stateless_http=True, json_response=True)
    async with serve(app) as url, httpx2.AsyncClient(timeout=10) as http:
        for header, status in (("eu", 200), ("us", 400)):
            body, headers = modern_tool_call("region_of", {"region": "eu"}, Region=header)
            response = await http.post(f"{url}/mcp", json=body, headers=headers)
            assert response.status_code == status, response.text
        assert "Mcp-Param-Region" in response.json()["error"]["message"]
