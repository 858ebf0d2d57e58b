"""No API key, Kling secret, admin token or JWT ever reaches a log line or an error a caller sees."""

from __future__ import annotations

import logging
import re

import anyio
import pytest
from mcp import Client

from app.kling import JwtCache, KlingCredentials
from tests.conftest import ADMIN_TOKEN, PRIMARY, RunningGateway, Simulator, bearer, mcp_client

pytestmark = pytest.mark.anyio
JWT_RE = re.compile(r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+")


async def test_a_full_run_logs_no_secret(
    gateway: RunningGateway, simulator: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # The simulator's access log shows Kling's paths; a uvicorn.Server started earlier in this process (with a
    # log_level of its own) may have raised the level of that logger, which outlives it.
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    api_key = await gateway.new_api_key("acme")
    headers = bearer(api_key)
    seen: list[str] = []
    with anyio.fail_after(30):
        rest = await gateway.http.post(
            f"{gateway.url}/generate", json={"prompt": "a fox", "wait_seconds": 10}, headers=headers
        )
        seen.append(rest.text)
        await simulator.control("faults", {"code": 1004, "http_status": 401, "times": 1, "path": "create"})
        await simulator.control("faults", {"code": 1002, "http_status": 401, "times": 2, "path": "create"})
        failed = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "a fox"}, headers=headers)
        seen.append(failed.text)
        client: Client
        async with mcp_client(gateway, api_key) as client:
            result = await client.call_tool("generate_image", {"prompt": "a cat"})
            seen.append(result.model_dump_json())
    jwt_example = JwtCache().token(KlingCredentials(PRIMARY.access_key, PRIMARY.secret_key))
    log_text = "\n".join(record.getMessage() for record in caplog.records)
    assert "/generate" in log_text
    assert "/v1/images/generations" in log_text
    logged = log_text + "\n".join(seen)
    for secret in (api_key, api_key.rsplit("_", 1)[1], PRIMARY.secret_key, ADMIN_TOKEN, jwt_example):
        assert secret not in logged
    assert not JWT_RE.search(logged)
