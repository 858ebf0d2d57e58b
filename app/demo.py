"""`kling-gateway demo`: the gateway, an in-process Kling simulator and a demo tenant in one process.

Needs no Redis and no Kling account. Everything lives in memory and is gone when the process stops.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket

import uvicorn

from app.config import Settings
from app.main import build_gateway
from app.simulator import SimAccount, SimulatorConfig, create_simulator_app

DEMO_ACCESS_KEY = "demo-access-key"
DEMO_DELAY_S = 4.0


def client_configs(mcp_url: str, api_key: str) -> dict[str, str]:
    """Ready-to-paste configurations for the common MCP clients, keyed by client name."""
    authorization = f"Bearer {api_key}"
    remote = {"url": mcp_url, "headers": {"Authorization": authorization}}
    return {
        "Claude Code": f'claude mcp add --transport http kling {mcp_url} --header "Authorization: {authorization}"',
        "Claude Desktop (claude_desktop_config.json)": json.dumps(
            {
                "mcpServers": {
                    "kling": {
                        "command": "npx",
                        "args": ["-y", "mcp-remote", mcp_url, "--header", f"Authorization:{authorization}"],
                    }
                }
            },
            indent=2,
        ),
        "Cursor (~/.cursor/mcp.json)": json.dumps({"mcpServers": {"kling": remote}}, indent=2),
        "VS Code (.vscode/mcp.json)": json.dumps({"servers": {"kling": {"type": "http", **remote}}}, indent=2),
    }


def banner(base_url: str, api_key: str) -> str:
    mcp_url = f"{base_url}/mcp"
    lines = [
        "Kling MCP Gateway demo (simulated Kling: no account needed, nothing is billed)",
        "",
        f"  MCP URL:  {mcp_url}",
        f"  API key:  {api_key}",
        f"  REST:     curl -s {base_url}/generate -H 'Authorization: Bearer {api_key}' "
        '-H \'Content-Type: application/json\' -d \'{"prompt": "a red fox", "wait_seconds": 30}\'',
        f"  API docs: {base_url}/docs",
        "",
    ]
    for client, config in client_configs(mcp_url, api_key).items():
        lines += [f"{client}:", config, ""]
    lines.append("Press Ctrl+C to stop.")
    return "\n".join(lines)


def _bound_socket(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only then (otherwise ~40 ms per keep-alive request).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Listening now means a client that reads the banner and connects at once waits in the backlog
    # instead of being refused while uvicorn starts.
    sock.listen(128)
    return sock


async def run_demo(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the simulator on a free loopback port and the gateway on `port` until cancelled."""
    account = SimAccount(DEMO_ACCESS_KEY, secrets.token_urlsafe(32), concurrency=20)
    sim_sock = _bound_socket("127.0.0.1", 0)
    gateway_sock = _bound_socket(host, port)
    sim_url = f"http://127.0.0.1:{sim_sock.getsockname()[1]}"
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104 - comparing, not binding
    base_url = f"http://{shown_host}:{gateway_sock.getsockname()[1]}"
    # The public URL is this loopback address, so the simulator's callbacks come back to the gateway.
    settings = Settings.model_validate({"kling_base_url": sim_url, "redis_url": None, "public_url": base_url})
    gateway = build_gateway(settings)
    credential = await gateway.directory.add_credential(account.access_key, account.secret_key, account.concurrency)
    tenant = await gateway.directory.create_tenant("demo", (credential.id,))
    issued = await gateway.directory.issue_key(tenant.id, "demo")
    servers = [
        uvicorn.Server(
            uvicorn.Config(
                create_simulator_app(SimulatorConfig((account,), delay=DEMO_DELAY_S)),
                log_level="warning",
                lifespan="on",
                ws="none",
            )
        ),
        uvicorn.Server(uvicorn.Config(gateway.app, log_level="info", lifespan="on", ws="none")),
    ]
    print(banner(base_url, issued.api_key), flush=True)
    serving = [
        asyncio.create_task(servers[0].serve(sockets=[sim_sock])),
        asyncio.create_task(servers[1].serve(sockets=[gateway_sock])),
    ]
    # uvicorn lets the last server started own Ctrl+C/SIGTERM; when either stops, stop the other too.
    await asyncio.wait(serving, return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*serving)
