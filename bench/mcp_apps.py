"""uvicorn factories for the MCP servers the benchmark measures the gateway's `/mcp` against (bench/mcp_calls.py):

- `noop_mcp_app`: the MCP SDK's own ceiling, a no-op tool on the gateway's transport settings (and, as the
  gateway without an exporter, without the SDK's span per message);
- `floor_mcp_app`: the same server with a tool that sends the create through the gateway's Kling client
  (BENCH_KLING_URL, BENCH_KLING_ACCOUNT as JSON [ak, sk]).
"""

from __future__ import annotations

from mcp.server import MCPServer
from starlette.applications import Starlette

from app.mcp_server import drop_sdk_spans
from app.models import GenerateRequest
from bench.apps import FloorKling


def floor_mcp_app() -> Starlette:
    """The no-op's server (`noop_mcp_app`) with a tool that sends the gateway's create to Kling and returns its task
    id: what a `generate_image` costs on this SDK before the gateway's own work. Its pool is closed by the process's
    exit (the SDK runs a server's lifespan per request when stateless)."""
    mcp = MCPServer("floor")
    drop_sdk_spans(mcp)  # as the gateway does while it exports no traces
    kling = FloorKling.from_env()

    @mcp.tool()
    async def generate_image(prompt: str, wait_seconds: int = 0) -> str:
        """Create a Kling task and return its id."""
        return (await kling.create(GenerateRequest(prompt=prompt, wait_seconds=wait_seconds))).task_id

    return mcp.streamable_http_app(streamable_http_path="/mcp", stateless_http=True, json_response=False)


def noop_mcp_app() -> Starlette:
    """The gateway's transport settings (stateless, SSE responses, DNS-rebinding check on) with one tool
    that does nothing: what the SDK itself costs per call."""
    mcp = MCPServer("noop")
    drop_sdk_spans(mcp)  # as the gateway does while it exports no traces

    @mcp.tool()
    async def noop(prompt: str, wait_seconds: int = 0) -> str:
        """Return at once."""
        return "ok"

    return mcp.streamable_http_app(streamable_http_path="/mcp", stateless_http=True, json_response=False)
