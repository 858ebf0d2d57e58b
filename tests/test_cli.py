"""The `kling-gateway` command, run as a user runs it: as a separate process."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp.types import ResourceLink
from PIL import Image
from redis.asyncio import Redis

from tests.conftest import (
    CLI,
    KEY_PEPPER,
    MASTER_KEY,
    PRIMARY,
    RunningGateway,
    Simulator,
    bearer,
    cli_env,
    mcp_client,
    run_cli,
)
from tests.servers import free_port

pytestmark = pytest.mark.anyio


async def test_tenants_and_keys_administered_from_the_cli_work_on_the_gateway(
    redis_gateway: RunningGateway, redis_url: str
) -> None:
    env = cli_env(KGW_REDIS_URL=redis_url, KGW_KEY_PEPPER=KEY_PEPPER, KGW_MASTER_KEY=MASTER_KEY)
    code, out, _ = await run_cli(
        "tenants", "create", "acme", "--kling-access-key", PRIMARY.access_key,
        "--kling-secret-key", PRIMARY.secret_key, env=env,
    )  # fmt: skip
    assert code == 0, out
    tenant_id = out.split()[2]
    code, listing, _ = await run_cli("tenants", "list", env=env)
    assert tenant_id in listing
    assert PRIMARY.secret_key not in listing

    code, api_key, _ = await run_cli("keys", "issue", tenant_id, "--label", "laptop", env=env)
    api_key = api_key.strip()
    assert code == 0
    assert api_key.startswith("kgw_")
    headers = bearer(api_key)
    accepted = await redis_gateway.http.post(f"{redis_gateway.url}/generate", json={"prompt": "x"}, headers=headers)
    assert accepted.status_code == 202

    key_id = api_key.split("_")[1]
    code, keys, _ = await run_cli("keys", "list", tenant_id, env=env)
    assert f"{key_id}\tactive\tlaptop" in keys
    assert api_key not in keys
    assert (await run_cli("keys", "revoke", key_id, env=env))[0] == 0
    refused = await redis_gateway.http.post(f"{redis_gateway.url}/generate", json={"prompt": "x"}, headers=headers)
    assert refused.status_code == 401


async def test_serve_with_redis_but_no_pepper_refuses_to_start(redis_url: str) -> None:
    code, _, err = await run_cli("serve", "--port", str(free_port()), env=cli_env(KGW_REDIS_URL=redis_url))
    assert code == 2
    assert "KGW_KEY_PEPPER" in err


async def test_serve_with_redis_but_no_master_key_refuses_to_start(redis_url: str) -> None:
    env = cli_env(KGW_REDIS_URL=redis_url, KGW_KEY_PEPPER=KEY_PEPPER)
    code, _, err = await run_cli("serve", "--port", str(free_port()), env=env)
    assert code == 2
    assert "KGW_MASTER_KEY" in err


async def test_master_key_rotation_reseals_secrets_so_the_old_key_can_be_dropped(redis_url: str, redis: Redis) -> None:
    code, new_key, _ = await run_cli("master-key", "new", env=cli_env())
    new_key = new_key.strip()
    assert code == 0
    assert len(new_key) == 44
    old_env = cli_env(KGW_REDIS_URL=redis_url, KGW_KEY_PEPPER=KEY_PEPPER, KGW_MASTER_KEY=MASTER_KEY)
    create = ["tenants", "create", "acme", "--kling-access-key", "ak", "--kling-secret-key", "sk-" + "s" * 32]
    assert (await run_cli(*create, env=old_env))[0] == 0
    rotating = old_env | {"KGW_MASTER_KEY": f"{new_key},{MASTER_KEY}"}
    code, out, _ = await run_cli("master-key", "rotate", env=rotating)
    assert (code, out.strip()) == (0, "re-sealed 1 Kling secret(s) under the first key of KGW_MASTER_KEY")
    new_only = old_env | {"KGW_MASTER_KEY": new_key}
    code, out, _ = await run_cli("tenants", "create", "acme-2", "--kling-access-key", "ak",
                                 "--kling-secret-key", "sk-" + "s" * 32, env=new_only)  # fmt: skip
    assert code == 0, out  # the shared account's sealed secret opens under the new key alone


async def test_a_tenant_created_from_the_cli_on_a_china_site_account_keeps_its_base_url(
    redis: Redis, redis_url: str
) -> None:
    env = cli_env(KGW_REDIS_URL=redis_url, KGW_KEY_PEPPER=KEY_PEPPER, KGW_MASTER_KEY=MASTER_KEY)
    create = ["tenants", "create", "acme", "--kling-access-key", "ak-cn", "--kling-secret-key", "sk-" + "s" * 32]
    code, _, err = await run_cli(*create, "--kling-base-url", "api-beijing.klingai.com", env=env)
    assert code == 2
    assert "--kling-base-url" in err
    assert "absolute http(s) URL" in err
    code, out, _ = await run_cli(*create, "--kling-base-url", "https://api-beijing.klingai.com/", env=env)
    assert code == 0, out
    (credential,) = [json.loads(raw) for raw in (await redis.mget(await redis.keys("kgw:credential:c_*"))) if raw]
    assert credential["base_url"] == "https://api-beijing.klingai.com"


async def test_a_tenant_created_from_the_cli_on_a_static_api_key(redis: Redis, redis_url: str) -> None:
    env = cli_env(KGW_REDIS_URL=redis_url, KGW_KEY_PEPPER=KEY_PEPPER, KGW_MASTER_KEY=MASTER_KEY)
    code, _, err = await run_cli("tenants", "create", "acme", "--kling-api-key", "k" * 40, "--kling-access-key", "ak",
                                 env=env)  # fmt: skip
    assert (code, "instead of" in err) == (2, True)
    code, out, _ = await run_cli("tenants", "create", "acme", "--kling-api-key", "k" * 40, env=env)
    assert code == 0, out
    assert "k" * 40 not in out
    (credential,) = [json.loads(raw) for raw in (await redis.mget(await redis.keys("kgw:credential:c_*"))) if raw]
    assert credential["static_key"] is True
    assert credential["access_key"].startswith("key-")


async def test_admin_verbs_without_redis_explain_what_to_set() -> None:
    code, _, err = await run_cli("tenants", "list", env=cli_env())
    assert code == 2
    assert "KGW_REDIS_URL" in err


async def test_generate_saves_the_images_and_prints_only_their_paths_when_piped(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    api_key = await gateway.new_api_key("acme")
    code, out, err = await run_cli(
        "generate", "a red fox", "--url", gateway.url, "--api-key", api_key, "--out", str(tmp_path),
        "--num-images", "2", env=cli_env(),
    )  # fmt: skip
    assert code == 0, err
    paths = [Path(line) for line in out.splitlines()]
    assert len(paths) == 2
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
    assert "succeeded" in err
    assert "\x1b[" not in out + err  # no live display: nothing is drawn


def read_until_closed(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every process holding the terminal has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def run_cli_on_terminal(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal, as from an interactive shell; return its exit
    code and everything it wrote to the terminal."""
    controller, terminal = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            *CLI, *args, env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal
        )
    finally:
        os.close(terminal)
    try:
        with anyio.fail_after(60):
            output = await anyio.to_thread.run_sync(read_until_closed, controller, abandon_on_cancel=True)
            code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        os.close(controller)
    return code, output.decode(errors="replace")


@pytest.mark.sim_delay(1.5)
async def test_generate_on_a_terminal_shows_status_and_elapsed_time_then_the_paths(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    api_key = await gateway.new_api_key("acme")
    code, output = await run_cli_on_terminal(
        "generate", "a red fox", "--url", gateway.url, "--api-key", api_key, "--out", str(tmp_path),
        env=cli_env(TERM="xterm-256color", COLUMNS="120"),
    )  # fmt: skip
    assert code == 0, output
    assert "\x1b[" in output  # drawn live, with terminal control sequences
    assert "generating" in output
    assert "0:00:01" in output  # the elapsed-time column, redrawn while waiting
    assert "saved 1 image(s)" in output
    [path] = re.findall(rf"{re.escape(str(tmp_path))}/[^\s\x1b]+\.png", output)
    with Image.open(path) as image:
        assert image.format == "PNG"


async def test_generate_reports_a_task_kling_failed(gateway: RunningGateway, simulator: Simulator) -> None:
    await simulator.control("outcomes", {"status": "failed", "message": "content risk control", "times": 1})
    api_key = await gateway.new_api_key("acme")
    code, out, err = await run_cli("generate", "x", "--url", gateway.url, "--api-key", api_key, env=cli_env())
    assert code == 1
    assert out == ""
    assert "error: Kling failed the task: content risk control" in err


async def test_generate_with_a_wrong_key_says_why(gateway: RunningGateway) -> None:
    code, out, err = await run_cli("generate", "x", "--url", gateway.url, "--api-key", "kgw_nonsense", env=cli_env())
    assert (code, out) == (1, "")
    assert "HTTP 401" in err


@asynccontextmanager
async def running_demo(port: int) -> AsyncIterator[tuple[str, str]]:
    """Start `kling-gateway demo`; yield (MCP URL, API key) read from what it prints."""
    process = await asyncio.create_subprocess_exec(
        *CLI, "demo", "--port", str(port), env=cli_env(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        found: dict[str, str] = {}
        with anyio.fail_after(30):
            while len(found) < 2:
                line = (await process.stdout.readline()).decode()
                assert line, "demo exited before printing its URL and key"
                for label in ("MCP URL:", "API key:"):
                    if line.strip().startswith(label):
                        found[label] = line.split(label, 1)[1].strip()
        yield found["MCP URL:"], found["API key:"]
    finally:
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(15):
            await process.wait()


async def test_the_demo_serves_mcp_and_an_mcp_client_generates_an_image_through_it() -> None:
    async with running_demo(free_port()) as (mcp_url, api_key):
        async with mcp_client(mcp_url.removesuffix("/mcp"), api_key) as client:
            with anyio.fail_after(60):
                result = await client.call_tool("generate_image", {"prompt": "a lighthouse"})
        assert not result.is_error
        [link] = [block for block in result.content if isinstance(block, ResourceLink)]
        async with httpx2.AsyncClient(headers=bearer(api_key), timeout=30) as http:
            image = await http.get(str(link.uri))
    assert image.headers["content-type"] == "image/png"


async def test_serve_runs_the_gateway_on_redis_until_interrupted(redis_url: str, simulator: Simulator) -> None:
    port = free_port()
    env = cli_env(
        KGW_REDIS_URL=redis_url, KGW_KEY_PEPPER=KEY_PEPPER, KGW_MASTER_KEY=MASTER_KEY, KGW_KLING_BASE_URL=simulator.url
    )
    process = await asyncio.create_subprocess_exec(
        *CLI, "serve", "--host", "127.0.0.1", "--port", str(port), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with httpx2.AsyncClient(timeout=2) as http:
            with anyio.fail_after(30):
                while True:
                    try:
                        ready = await http.get(f"http://127.0.0.1:{port}/readyz")
                        break
                    except httpx2.ConnectError:
                        await anyio.sleep(0.1)  # nothing to await but the port opening
        assert ready.json() == {"status": "ok"}
    finally:
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(15):
            assert await process.wait() == 0
