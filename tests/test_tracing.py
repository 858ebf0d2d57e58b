"""OpenTelemetry tracing: nothing set up without an exporter configured; with one, a served gateway traces each
request as a SERVER span with a CLIENT span per Kling call in the same trace, over real OTLP/HTTP to a
collector on loopback, with the request id and no secret."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx2
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.tracing import Tracing, configure_tracing, gateway_resource, kling_span, trace_ids, tracing_wanted
from tests.conftest import (
    PRIMARY,
    RunningGateway,
    Simulator,
    bearer,
    gateway_settings,
    mcp_client,
    replica_env,
    running_gateway,
)
from tests.servers import gateway_process, serve

pytestmark = pytest.mark.anyio
OTEL_SETTINGS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER",
                 "OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES")  # fmt: skip
CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_SETTINGS:
        monkeypatch.delenv(name, raising=False)


@dataclass(frozen=True)
class ExportedSpan:
    """A span as an OTLP collector receives it."""

    name: str
    scope: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, object]
    resource: dict[str, object]


def attributes_of(pairs: Sequence[KeyValue]) -> dict[str, object]:
    values: dict[str, object] = {}
    for pair in pairs:
        kind = pair.value.WhichOneof("value")
        assert kind is not None
        values[pair.key] = getattr(pair.value, kind)
    return values


@dataclass
class Collector:
    """An OTLP/HTTP trace receiver: decodes each protobuf export, keeping the spans and the raw bodies."""

    spans: list[ExportedSpan]
    bodies: list[bytes]

    async def traces(self, request: Request) -> Response:
        body = await request.body()
        self.bodies.append(body)
        for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
            resource = attributes_of(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(
                    ExportedSpan(span.name, scope_spans.scope.name, span.trace_id.hex(), span.span_id.hex(),
                                 span.parent_span_id.hex(), attributes_of(span.attributes), resource)
                    for span in scope_spans.spans
                )  # fmt: skip
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf")

    def only(self, name: str, **attributes: object) -> ExportedSpan:
        [span] = [span for span in self.spans
                  if span.name == name and attributes.items() <= span.attributes.items()]  # fmt: skip
        return span

    def in_trace(self, trace_id: str, name: str) -> list[ExportedSpan]:
        return [span for span in self.spans if span.trace_id == trace_id and span.name == name]


@asynccontextmanager
async def otlp_collector() -> AsyncIterator[tuple[str, Collector]]:
    collector = Collector(spans=[], bodies=[])
    app = Starlette(routes=[Route("/v1/traces", collector.traces, methods=["POST"])])
    async with serve(app) as url:
        yield url, collector


def test_tracing_is_wanted_only_when_an_otlp_exporter_is_configured() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert not tracing_wanted({})
    assert tracing_wanted(endpoint)
    assert tracing_wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert tracing_wanted({"OTEL_TRACES_EXPORTER": "otlp"})  # to the default endpoint, localhost:4318
    assert not tracing_wanted(endpoint | {"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing_wanted(endpoint | {"OTEL_SDK_DISABLED": "true"})
    assert not tracing_wanted({"OTEL_TRACES_EXPORTER": "console"})


async def test_without_an_exporter_configured_nothing_is_set_up(no_otel_env: None, simulator: Simulator) -> None:
    assert configure_tracing() is None
    async with running_gateway(gateway_settings(simulator)) as running:
        api_key = await running.new_api_key("acme")
        with anyio.fail_after(30):
            response = await running.http.post(f"{running.url}/generate", json={"prompt": "x"}, headers=bearer(api_key))
        assert response.status_code == 202, response.text
        assert kling_span("create") is None
        assert not trace_ids()
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def test_an_exporter_setting_without_the_otel_extra_logs_one_warning_and_runs_untraced(
    no_otel_env: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    # As if `pip install kling-mcp-gateway` ran without `[otel]`: importing the SDK parts fails.
    for module in ("opentelemetry.exporter.otlp.proto.http.trace_exporter", "opentelemetry.sdk.trace"):
        monkeypatch.setitem(sys.modules, module, None)
    with caplog.at_level(logging.WARNING, logger="app.tracing"):
        assert configure_tracing() is None
    [warning] = [record for record in caplog.records if record.name == "app.tracing"]
    assert "kling-mcp-gateway[otel]" in warning.getMessage()
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def test_the_service_is_kling_gateway_unless_the_environment_names_it(
    no_otel_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert gateway_resource().attributes["service.name"] == "kling-gateway"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.namespace=media,deployment.environment.name=ci")
    attributes = gateway_resource().attributes
    assert (attributes["service.name"], attributes["service.namespace"]) == ("kling-gateway", "media")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "kgw-eu")
    assert gateway_resource().attributes["service.name"] == "kgw-eu"


async def test_a_traced_request_and_its_kling_call_share_the_callers_trace_and_the_log_line_names_it(
    no_otel_env: None, simulator: Simulator, log_lines: io.StringIO
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=gateway_resource(), shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider, shutdown=provider.shutdown)
    headers = {"X-Request-ID": "traced-1", "traceparent": f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"}
    async with running_gateway(gateway_settings(simulator), tracing) as running:
        api_key = await running.new_api_key("acme")
        with anyio.fail_after(30):
            response = await running.http.post(
                f"{running.url}/generate", json={"prompt": "x"}, headers=bearer(api_key) | headers
            )
    assert response.status_code == 202, response.text

    spans = exporter.get_finished_spans()
    [server] = [span for span in spans if span.attributes and span.attributes.get("kgw.request_id") == "traced-1"]
    assert (server.name, server.kind) == ("POST /generate", trace.SpanKind.SERVER)
    assert server.context is not None
    assert server.parent is not None
    assert (f"{server.context.trace_id:032x}", f"{server.parent.span_id:016x}") == (CALLER_TRACE_ID, CALLER_SPAN_ID)
    [create] = [span for span in spans if span.name == "kling create"]
    assert create.kind == trace.SpanKind.CLIENT
    assert create.parent is not None
    assert create.parent.span_id == server.context.span_id
    assert dict(create.attributes or {}) == {
        "kling.endpoint": "create", "kling.code": "0", "kling.task_id": response.json()["task_id"]
    }  # fmt: skip
    assert_no_secret_in(spans, api_key)

    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    [request_line] = [line for line in lines if line["logger"] == "app.requests" and line["request_id"] == "traced-1"]
    assert (request_line["trace_id"], request_line["span_id"]) == (CALLER_TRACE_ID, f"{server.context.span_id:016x}")
    # Every other line written while the request ran names its trace too.
    assert {line.get("trace_id") for line in lines if line.get("request_id") == "traced-1"} == {CALLER_TRACE_ID}


def assert_no_secret_in(spans: Sequence[ReadableSpan], api_key: str) -> None:
    values = " ".join(str(value) for span in spans for value in (span.attributes or {}).values())
    for secret in (api_key, PRIMARY.access_key, PRIMARY.secret_key, "Bearer", "eyJ"):
        assert secret not in values


async def test_a_gateway_with_an_otlp_endpoint_exports_rest_and_mcp_generations_as_traces_when_it_stops(
    redis_gateway: RunningGateway, simulator: Simulator, redis_url: str
) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    async with otlp_collector() as (collector_url, collector):
        env = replica_env(redis_url, simulator.url) | {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector_url,
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=ci",
        }
        async with gateway_process(env) as replica, httpx2.AsyncClient(timeout=30) as http:
            with anyio.fail_after(30):
                rest = await http.post(f"{replica.url}/generate", json={"prompt": "x", "wait_seconds": 20},
                                       headers=bearer(api_key) | {"X-Request-ID": "rest-1"})  # fmt: skip
                async with mcp_client(replica.url, api_key) as client:
                    tool = await client.call_tool("generate_image", {"prompt": "y", "wait_seconds": 20})
        # The replica has stopped: its lifespan exported every span still queued.
    assert rest.status_code == 200, rest.text
    assert not tool.is_error

    server = collector.only("POST /generate", **{"kgw.request_id": "rest-1"})
    assert server.scope == "kling_mcp_gateway"
    assert server.attributes["http.response.status_code"] == 200
    assert str(server.attributes["kgw.tenant_id"]).startswith("t_")
    assert server.resource["service.name"] == "kling-gateway"
    assert server.resource["deployment.environment.name"] == "ci"
    [create] = collector.in_trace(server.trace_id, "kling create")
    assert create.parent_span_id == server.span_id
    assert create.attributes["kling.task_id"] == rest.json()["task_id"]

    # The MCP SDK's own span for the tool call sits under our span for its HTTP request.
    mcp_call = collector.only("tools/call generate_image")
    assert mcp_call.scope == "mcp-python-sdk"
    [mcp_request] = [span for span in collector.spans if span.span_id == mcp_call.parent_span_id]
    assert mcp_request.name == "POST /mcp"
    assert mcp_request.attributes["kgw.tool"] == "generate_image"
    [tool_create] = collector.in_trace(mcp_call.trace_id, "kling create")
    assert tool_create.parent_span_id == mcp_call.span_id
    assert not [span for span in collector.spans if span.attributes.get("http.route") == "/readyz"]  # probes: untraced

    for body in collector.bodies:
        for secret in (api_key, PRIMARY.access_key, PRIMARY.secret_key, "Bearer", "eyJ"):
            assert secret.encode() not in body
