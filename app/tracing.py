"""Optional OpenTelemetry tracing: on only when the standard `OTEL_*` environment configures an exporter,
a no-op otherwise.

On (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_TRACES_EXPORTER=otlp`),
the process gets a tracer provider for service `kling-gateway` (`OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES` win over that) that batches spans to a collector over OTLP/HTTP; the SDK reads
the rest of `OTEL_*` itself (headers, timeout, sampler, batch sizes). The gateway makes a SERVER span per
HTTP request and a CLIENT span per call to Kling; the MCP SDK, which already emits spans through
opentelemetry-api (one per MCP message), lands in the same traces. Log lines written inside a span carry
its trace and span ids.

Off, nothing is set up: the hooks below return at once, and the SDK (the optional extra
`kling-mcp-gateway[otel]`) is never imported.

Spans carry route templates, ids and codes: never a raw path (callback URLs hold a token), a header, a
key or an exception's message (it may quote a caller's input).

OpenTelemetry's provider is process-wide, and so is this: a process serves one gateway (uvicorn's workers
are processes of their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from collections.abc import Set as AbstractSet
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer
from starlette.types import Scope

from app import __version__

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

    from app.logs import RequestContext

logger = logging.getLogger(__name__)
SERVICE_NAME = "kling-gateway"
OTLP_HTTP = "http/protobuf"

# Set while a traced gateway runs; every hook checks it first, so tracing off costs one comparison.
_tracer: Tracer | None = None
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()
_NO_IDS: Mapping[str, str] = MappingProxyType({})


def _exporters(environ: Mapping[str, str]) -> set[str]:
    return {name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()}


def tracing_wanted(environ: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces exported over OTLP: `OTEL_TRACES_EXPORTER` naming `otlp`, or
    (when that is unset) an OTLP endpoint. `OTEL_SDK_DISABLED=true` and `OTEL_TRACES_EXPORTER=none` win."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = _exporters(environ)
    if exporters:
        return "otlp" in exporters
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class Tracing:
    """Tracing for one running gateway: where its tracer comes from, and what stops the provider."""

    def __init__(self, provider: trace.TracerProvider, shutdown: Callable[[], Any] | None) -> None:
        self._provider = provider
        self._shutdown = shutdown

    @contextlib.asynccontextmanager
    async def active(self) -> AsyncIterator[None]:
        """While the gateway runs, its requests and Kling calls make spans. At exit the spans still queued
        are exported and the provider shut down, off the event loop: the exporter blocks on its HTTP call."""
        global _tracer
        _tracer = self._provider.get_tracer("kling_mcp_gateway", __version__)
        try:
            yield
        finally:
            _tracer = None
            if self._shutdown is not None:
                await asyncio.to_thread(self._shutdown)


def configure_tracing() -> Tracing | None:
    """The process's tracing as the `OTEL_*` environment configures it, or None (off, with one warning if
    it was asked for but cannot run)."""
    environ = os.environ
    if not tracing_wanted(environ):
        unsupported = _exporters(environ) - {"otlp", "none"}
        if unsupported:
            logger.warning("OTEL_TRACES_EXPORTER=%s: only otlp is supported; running without tracing",
                           ",".join(sorted(unsupported)))  # fmt: skip
        return None
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol not in (None, "", OTLP_HTTP):
        logger.warning("OTLP protocol %s: only %s is supported; running without tracing", protocol, OTLP_HTTP)
        return None
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):
        # Already set up (by `opentelemetry-instrument`, say): use it as it is, and leave stopping it to its owner.
        return Tracing(current, shutdown=None)
    try:
        provider = _otlp_provider()
    except ImportError:
        logger.warning("OTEL_* asks for tracing, but the OpenTelemetry SDK is not installed "
                       "(pip install 'kling-mcp-gateway[otel]'); running without tracing")  # fmt: skip
        return None
    trace.set_tracer_provider(provider)
    return Tracing(provider, shutdown=provider.shutdown)


def _otlp_provider() -> SdkTracerProvider:
    """A provider batching spans to OTLP/HTTP, both configured by the environment.

    Raises:
        ImportError: the `otel` extra is not installed.
    """
    # Imported here, not at the top: the SDK is an optional extra, needed only when tracing is on.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=gateway_resource())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def gateway_resource() -> Resource:
    """What the spans come from: service `kling-gateway` at this version, unless `OTEL_SERVICE_NAME` or
    `OTEL_RESOURCE_ATTRIBUTES` say otherwise (needs the `otel` extra)."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    # `Resource.create` lets its arguments win over the environment; merging the environment on top again
    # makes ours defaults only.
    defaults = Resource.create({"service.name": SERVICE_NAME, "service.version": __version__})
    return defaults.merge(OTELResourceDetector().detect())


def request_span(scope: Scope, untraced: AbstractSet[str]) -> contextlib.AbstractContextManager[Span | None]:
    """A SERVER span around one HTTP request, current while it runs, continuing the caller's trace (W3C
    `traceparent`); `describe_request` names it once the route is known. Yields None when tracing is off, and
    for the `untraced` paths (probes and scrapes: a trace every few seconds that says nothing)."""
    if _tracer is None or scope["path"] in untraced:
        return _NO_SPAN
    carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
    parent = extract(carrier, context=otel_context.get_current())  # without a `traceparent`, the current context
    return _tracer.start_as_current_span(
        scope["method"], context=parent, kind=SpanKind.SERVER,
        record_exception=False, set_status_on_exception=False,  # describe_request sets the status from the answer
    )  # fmt: skip


def describe_request(span: Span | None, request: RequestContext, status: int) -> None:
    """Name the request's span after its route template and record what the request log line says."""
    if span is None:
        return
    route = request.route or "unmatched"
    span.update_name(request.method if route == "unmatched" else f"{request.method} {route}")
    attributes: dict[str, str | int] = {
        "http.request.method": request.method,
        "http.route": route,
        "http.response.status_code": status,
        "kgw.request_id": request.request_id,
    }
    for name, value in (("kgw.tenant_id", request.tenant_id), ("kgw.tool", request.tool),
                        ("kling.task_id", request.kling_task_id)):  # fmt: skip
        if value is not None:
            attributes[name] = value
    span.set_attributes(attributes)
    if status >= 500:
        span.set_attribute("error.type", str(status))
        span.set_status(StatusCode.ERROR)


def kling_span(endpoint: str) -> Span | None:
    """A CLIENT span for one HTTP call to Kling, under the current span: the request's, or none for the
    follower's polls, which run in a context of their own. None when tracing is off."""
    if _tracer is None:
        return None
    return _tracer.start_span(f"kling {endpoint}", kind=SpanKind.CLIENT, attributes={"kling.endpoint": endpoint})


def end_kling_span(span: Span | None, code: str, task_id: str | None) -> None:
    """Record how the Kling call ended (Kling's code, or how it failed) and the task it was about."""
    if span is None:
        return
    span.set_attribute("kling.code", code)
    if task_id is not None:
        span.set_attribute("kling.task_id", task_id)
    if code != "0":
        span.set_attribute("error.type", code)
        span.set_status(StatusCode.ERROR)
    span.end()


def trace_ids() -> Mapping[str, str]:
    """The current span's trace and span ids, for log lines; empty when tracing is off or no span runs."""
    if _tracer is None:
        return _NO_IDS
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return _NO_IDS
    return {"trace_id": trace.format_trace_id(context.trace_id), "span_id": trace.format_span_id(context.span_id)}
