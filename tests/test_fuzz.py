"""Schemathesis drives the REST API from its own OpenAPI document: whatever it sends, no 5xx comes back."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import anyio
import pytest

from tests.conftest import ADMIN_TOKEN, RunningGateway

pytestmark = pytest.mark.anyio
SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent))


async def fuzz(gateway: RunningGateway, token: str, *operations: str) -> tuple[int, str]:
    assert SCHEMATHESIS is not None, "schemathesis is a dev dependency: make install"
    selection = [arg for operation in operations for arg in ("--include-path-regex", operation)]
    process = await asyncio.create_subprocess_exec(
        SCHEMATHESIS, "run", f"{gateway.url}/openapi.json", "-H", f"Authorization: Bearer {token}",
        "--checks", "not_a_server_error", "--max-examples", "25", "--phases", "examples,coverage,fuzzing",
        "--seed", "20261125", "--request-timeout", "30", *selection,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    with anyio.fail_after(240):
        output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_callers_routes_answer_no_5xx_to_generated_requests(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("acme")
    code, output = await fuzz(gateway, api_key, "^/(generate|tasks|usage)")
    assert code == 0, output[-3000:]
    assert " passed" in output


async def test_admin_routes_answer_no_5xx_to_generated_requests(gateway: RunningGateway) -> None:
    await gateway.new_api_key("acme")
    code, output = await fuzz(gateway, ADMIN_TOKEN, "^/admin")
    assert code == 0, output[-3000:]
    assert " passed" in output
