"""Metrics, request logs, request ids and Server-Timing, on a served gateway; and metrics that add up
across the workers of `kling-gateway serve --workers 2`."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import logging.config
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx2
import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from redis.exceptions import ConnectionError as RedisConnectionError

from app.http_pool import create_http_client
from app.logs import JsonFormatter, TextFormatter, logging_config
from app.main import create_redis
from app.metrics import forget_dead_workers
from app.observability import MAX_REQUEST_ID_CHARS, request_id_from
from tests.conftest import ADMIN, PRIMARY, RunningGateway, Simulator, bearer, mcp_client, replica_env
from tests.servers import free_port, gateway_process, loopback_server

pytestmark = pytest.mark.anyio
FAMILIES = (
    "kgw_http_requests_total",
    "kgw_http_request_seconds",
    "kgw_gateway_added_seconds",
    "kgw_mcp_tool_calls_total",
    "kgw_mcp_tool_call_seconds",
    "kgw_kling_requests_total",
    "kgw_kling_request_seconds",
    "kgw_limiter_decisions_total",
    "kgw_tasks_in_flight",
    "kgw_waiters",
    "kgw_redis_errors_total",
    "kgw_breaker_open",
)
SERVER_TIMING = re.compile(r"^gateway;dur=([\d.]+), kling;dur=([\d.]+), wait;dur=([\d.]+)$")


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent); labels match exactly, in any order."""
    for line in metrics.splitlines():
        found = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if found and dict(re.findall(r'(\w+)="([^"]*)"', found.group(1) or "")) == labels:
            return float(found.group(2))
    return 0.0


async def test_a_served_gateway_exports_every_metric_family_after_rest_and_mcp_generations(
    redis_gateway: RunningGateway,
) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    with anyio.fail_after(30):
        rest = await redis_gateway.http.post(f"{redis_gateway.url}/generate", json={"prompt": "x", "wait_seconds": 20},
                                             headers=bearer(api_key))  # fmt: skip
        async with mcp_client(redis_gateway.url, api_key) as client:
            tool = await client.call_tool("generate_image", {"prompt": "y", "wait_seconds": 20})
        await redis_gateway.http.get(f"{redis_gateway.url}/tasks/{rest.json()['task_id']}", headers=bearer(api_key))
    assert rest.status_code == 200, rest.text
    assert not tool.is_error

    metrics = (await redis_gateway.http.get(f"{redis_gateway.url}/metrics")).text
    for family in FAMILIES:
        assert f"# TYPE {family} " in metrics, family
    assert sample(metrics, "kgw_http_requests_total", method="POST", route="/generate", status="200") >= 1
    assert sample(metrics, "kgw_http_requests_total", method="GET", route="/tasks/{task_id}", status="200") >= 1
    assert sample(metrics, "kgw_http_requests_total", method="POST", route="/mcp", status="200") >= 1
    assert sample(metrics, "kgw_mcp_tool_calls_total", tool="generate_image", outcome="succeeded") >= 1
    assert sample(metrics, "kgw_kling_requests_total", endpoint="create", code="0") >= 2
    assert sample(metrics, "kgw_limiter_decisions_total", limit="concurrent_tasks", result="admitted") >= 2
    assert sample(metrics, "kgw_gateway_added_seconds_count", route="/generate") >= 1
    credentials = (await redis_gateway.http.get(f"{redis_gateway.url}/admin/credentials", headers=ADMIN)).json()
    [credential_id] = [credential["id"] for credential in credentials]
    assert f'kgw_breaker_open{{credential="{credential_id}"}} 0.0' in metrics  # by id, never by access key
    for secret in (api_key, PRIMARY.access_key, PRIMARY.secret_key):
        assert secret not in metrics


async def test_tool_calls_are_counted_by_tool_and_outcome(redis_gateway: RunningGateway) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    with anyio.fail_after(30):
        async with mcp_client(redis_gateway.url, api_key, mode="legacy") as client:
            await client.call_tool("check_image_status", {"task_id": "no-such-task"})
    metrics = (await redis_gateway.http.get(f"{redis_gateway.url}/metrics")).text
    assert sample(metrics, "kgw_mcp_tool_calls_total", tool="check_image_status", outcome="not_found") >= 1


async def test_each_request_logs_one_json_line_with_the_request_id_of_its_response_and_no_secret(
    redis_gateway: RunningGateway, log_lines: io.StringIO
) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    headers = bearer(api_key) | {"X-Request-ID": "order 42/<b>"}
    with anyio.fail_after(30):
        rest = await redis_gateway.http.post(f"{redis_gateway.url}/generate", json={"prompt": "x", "wait_seconds": 20},
                                             headers=headers)  # fmt: skip
        async with mcp_client(redis_gateway.url, api_key, mode="legacy") as client:
            tool = await client.call_tool("generate_image", {"prompt": "y", "wait_seconds": 20})
    assert rest.status_code == 200, rest.text
    assert not tool.is_error
    assert rest.headers["x-request-id"] == "order42b"  # sanitized: only safe characters are kept

    text = log_lines.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    requests = [line for line in lines if line["logger"] == "app.requests"]
    [generate] = [line for line in requests if line["request_id"] == "order42b"]
    tenant_id = generate["tenant_id"]
    assert tenant_id.startswith("t_")
    assert generate["route"] == "/generate"
    assert generate["status"] == 200
    assert generate["kling_task_id"] == rest.json()["task_id"]
    assert generate["kling_code"] == 0
    assert generate["latency_ms"] >= generate["kling_ms"] > 0
    assert {"ts", "level", "gateway_ms", "wait_ms"} <= generate.keys()
    [mcp_call] = [line for line in requests if line.get("tool") == "generate_image"]
    assert (mcp_call["route"], mcp_call["status"], mcp_call["tenant_id"]) == ("/mcp", 200, tenant_id)
    assert isinstance(tool.structured_content, dict)
    assert mcp_call["kling_task_id"] == tool.structured_content["task_id"]
    for secret in (api_key, PRIMARY.secret_key, "Bearer ", "eyJ"):
        assert secret not in text


async def test_rest_responses_carry_server_timing_that_splits_our_work_from_klings(
    gateway: RunningGateway,
) -> None:
    api_key = await gateway.new_api_key("acme")
    with anyio.fail_after(30):
        response = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "x"}, headers=bearer(api_key))
    assert response.status_code == 202
    timing = SERVER_TIMING.match(response.headers["server-timing"])
    assert timing is not None, response.headers["server-timing"]
    gateway_ms, kling_ms, _ = (float(value) for value in timing.groups())
    assert gateway_ms > 0
    assert kling_ms > 0  # the create


async def test_mcp_responses_carry_a_request_id_and_server_timing(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("acme")
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = bearer(api_key) | {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-11-25"}
    response = await gateway.http.post(f"{gateway.url}/mcp", json=body, headers=headers)
    assert response.status_code == 200, response.text
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    assert SERVER_TIMING.match(response.headers["server-timing"])


async def test_an_unexpected_failure_answers_500_with_the_request_id_to_report(gateway: RunningGateway) -> None:
    """A bug's 500, sent by FastAPI's last-resort handler, still carries the request id the log line has."""

    async def broken() -> None:
        raise RuntimeError("a bug")

    # The only way to reach that handler on purpose; the router reads its routes on every request.
    gateway.gateway.app.add_api_route("/broken", broken, methods=["GET"])
    response = await gateway.http.get(f"{gateway.url}/broken", headers={"X-Request-ID": "bug-1"})
    metrics = (await gateway.http.get(f"{gateway.url}/metrics")).text
    assert (response.status_code, response.headers["x-request-id"]) == (500, "bug-1")
    assert SERVER_TIMING.match(response.headers["server-timing"])
    assert sample(metrics, "kgw_http_requests_total", method="GET", route="/broken", status="500") == 1


async def test_refusals_before_any_route_still_get_a_request_id(gateway: RunningGateway) -> None:
    response = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "x"}, headers={"X-Request-ID": "r-1"})
    assert (response.status_code, response.headers["x-request-id"]) == (401, "r-1")
    metrics = (await gateway.http.get(f"{gateway.url}/metrics")).text
    assert sample(metrics, "kgw_http_requests_total", method="POST", route="/generate", status="401") >= 1
    await gateway.http.get(f"{gateway.url}/no/such/path/123")
    metrics = (await gateway.http.get(f"{gateway.url}/metrics")).text
    assert "/no/such/path" not in metrics  # raw paths never become labels
    assert sample(metrics, "kgw_http_requests_total", method="GET", route="unmatched", status="404") >= 1


def test_request_ids_are_kept_when_safe_and_replaced_when_empty() -> None:
    assert request_id_from([(b"x-request-id", b"abc-123:4.5_6")]) == "abc-123:4.5_6"
    assert request_id_from([(b"x-request-id", b"a\r\nb c")]) == "abc"
    assert len(request_id_from([(b"x-request-id", b"x" * 500)])) == MAX_REQUEST_ID_CHARS
    assert re.fullmatch(r"[0-9a-f]{32}", request_id_from([(b"x-request-id", b"<>\"'")]))
    assert request_id_from([]) != request_id_from([])


def test_formatters_mask_anything_shaped_like_a_key_a_token_or_a_jwt() -> None:
    key = "kgw_" + "a" * 12 + "_" + "b" * 38
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJhayJ9.c2lnbmF0dXJl"
    record = logging.LogRecord("app", logging.WARNING, __file__, 1, "got %s and %s and %s", (key, f"Bearer {jwt}",
                               jwt), None)  # fmt: skip
    for formatter in (JsonFormatter(), TextFormatter()):
        line = formatter.format(record)
        assert key not in line
        assert jwt not in line
        assert "got [redacted]" in line


_CONFIGURED_LOGGERS = ("", *logging_config(json_lines=True)["loggers"])  # "": the root


@contextlib.contextmanager
def gateway_logging(*, json_lines: bool) -> Iterator[None]:
    """The gateway's logging configuration, as `serve` applies it, for the test's duration (stdout is the test's
    captured one); the loggers it touches are put back afterwards."""
    saved = [(logger, logger.handlers[:], logger.level, logger.propagate)
             for logger in map(logging.getLogger, _CONFIGURED_LOGGERS)]  # fmt: skip
    logging.config.dictConfig(logging_config(json_lines=json_lines))
    try:
        yield
    finally:
        for logger, handlers, level, propagate in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate


@pytest.mark.parametrize("json_lines", [True, False], ids=["off a terminal", "on a terminal"])
def test_logs_are_json_off_a_terminal_and_text_on_one(json_lines: bool, capsys: pytest.CaptureFixture[str]) -> None:
    with gateway_logging(json_lines=json_lines):
        logging.getLogger("app.images").warning("could not record usage of tenant %s", "t_1")
    [line] = capsys.readouterr().out.splitlines()
    if json_lines:
        assert json.loads(line)["msg"] == "could not record usage of tenant t_1"
    else:
        assert "WARNING" in line
        assert line.endswith("could not record usage of tenant t_1")


def per_worker(directory: Path, family: str, **labels: str) -> dict[str, float]:
    """A counter's value in each worker's own file of the multiprocess directory, by process id."""
    values: dict[str, float] = {}
    for path in directory.glob("counter_*.db"):
        total = 0.0
        # prometheus-client leaves merge untyped.
        for metric in MultiProcessCollector.merge([str(path)], accumulate=True):  # type: ignore[no-untyped-call]
            for found in metric.samples:
                if found.name == family and found.labels == labels:
                    total += found.value
        values[path.stem.removeprefix("counter_")] = total
    return values


@pytest.mark.sim_delay(0.2)
async def test_serve_with_two_workers_reports_metrics_summed_over_both(
    redis_gateway: RunningGateway, simulator: Simulator, redis_url: str, tmp_path: Path
) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"left over from an earlier run")
    env = replica_env(redis_url, simulator.url) | {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    generate = {"method": "POST", "route": "/generate", "status": "202"}
    sent = 0
    async with gateway_process(env, workers=2) as server:
        assert not (metrics_dir / "counter_1.db").exists()  # cleared at start
        # A new connection per request, so the kernel hands requests to both workers.
        fresh = httpx2.Limits(max_keepalive_connections=0)
        async with httpx2.AsyncClient(timeout=30, limits=fresh) as http:

            async def submit() -> None:
                answer = await http.post(f"{server.url}/generate", json={"prompt": "x"}, headers=bearer(api_key))
                assert answer.status_code == 202, answer.text

            with anyio.fail_after(60):
                # Which worker accepts a connection is the kernel's choice: send until both have served some.
                while sum(1 for count in per_worker(metrics_dir, "kgw_http_requests_total", **generate).values()
                          if count > 0) < 2:  # fmt: skip
                    async with anyio.create_task_group() as group:
                        for _ in range(4):
                            group.start_soon(submit)
                    sent += 4
            # A legacy SSE session would live in one worker while its POSTs reach either: the transport is off.
            legacy = await http.get(f"{server.url}/sse", headers=bearer(api_key))
            assert legacy.status_code == 404
            assert "/mcp" in legacy.json()["error"]["message"]
            for _ in range(6):
                metrics = (await http.get(f"{server.url}/metrics")).text
                assert sample(metrics, "kgw_http_requests_total", **generate) == sent
                assert sample(metrics, "kgw_kling_requests_total", endpoint="create", code="0") == sent
    assert sum(per_worker(metrics_dir, "kgw_http_requests_total", **generate).values()) == sent


async def test_outgoing_request_lines_are_not_logged_since_urls_may_carry_a_receivers_secret(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """httpx2 logs each request's full URL at INFO: a webhook_url such as /services/T000/B000/SECRET would leak."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    async with loopback_server(answer) as port:
        url = f"http://127.0.0.1:{port}/services/T000/B000/SECRET-hook-token"
        with gateway_logging(json_lines=True), anyio.fail_after(10):
            async with create_http_client() as http:
                assert (await http.post(url, json={"task_id": "t"})).status_code == 200
            logging.getLogger("app.webhooks").info("webhook delivered")  # the configuration does log INFO
    out = capsys.readouterr().out
    assert "webhook delivered" in out
    assert "SECRET-hook-token" not in out


def test_a_killed_workers_live_gauges_are_dropped_when_a_worker_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def waiters() -> float | None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
        return registry.get_sample_value("kgw_waiters")

    # A worker that counted 3 waiters and then died without its clean exit (killed, out of memory).
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", "from app.metrics import WAITERS; WAITERS.inc(3)"], env=env, check=True)
    assert waiters() == 3
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    forget_dead_workers()  # what every worker does as it starts
    assert not waiters()  # its share is gone (no worker left to report any)


async def test_a_failed_redis_connection_is_counted_once() -> None:
    # The pool's connect runs inside the command's retry: both wrap it, and only one may count.
    client = create_redis(f"redis://127.0.0.1:{free_port()}/0")
    before = REGISTRY.get_sample_value("kgw_redis_errors_total", {"kind": "connection"}) or 0.0
    with pytest.raises(RedisConnectionError):
        await client.ping()
    await client.aclose()
    assert REGISTRY.get_sample_value("kgw_redis_errors_total", {"kind": "connection"}) == before + 1


async def test_scrapes_and_probes_are_counted_under_their_route_and_kept_out_of_the_request_log(
    gateway: RunningGateway, log_lines: io.StringIO
) -> None:
    for path in ("/metrics", "/healthz", "/metrics"):
        assert (await gateway.http.get(f"{gateway.url}{path}")).status_code == 200
    metrics = (await gateway.http.get(f"{gateway.url}/metrics")).text
    assert sample(metrics, "kgw_http_requests_total", method="GET", route="/metrics", status="200") >= 2
    assert sample(metrics, "kgw_http_requests_total", method="GET", route="/healthz", status="200") >= 1
    logged = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    assert [line for line in logged if line["logger"] == "app.requests"] == []
