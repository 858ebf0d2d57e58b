"""MCP tools over ImageService: `generate_image` and `check_image_status`, and the transports they are served on.

The server runs stateless with SSE responses (see reference/mcp-sdk.md §0): any replica serves any
request, in both protocol eras, and progress notifications can flow while a tool waits on Kling.
Failures a model can act on come back as results with `isError: true`, never as protocol errors.
Old clients that speak only the deprecated HTTP+SSE transport get it at `GET /sse` + `POST /messages/`:
its sessions live in one process, so with several replicas it needs sticky routing.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from mcp.server import MCPServer
from mcp.server._otel import OpenTelemetryMiddleware  # the SDK's span per message (`build_mcp_server`)
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.mcpserver import Context
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.inbound import find_invalid_x_mcp_header, x_mcp_header_map
from mcp.types import CallToolResult, ContentBlock, ImageContent, ResourceLink, TextContent, ToolAnnotations
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app import __version__
from app.auth import Authenticator, McpAuthMiddleware, current_principal
from app.errors import KNOWN_ERRORS, Unauthorized, gateway_error_from, tool_error_result
from app.images import ImageService, Outcome, Principal
from app.models import (
    AspectRatioArg,
    GenerateRequest,
    HumanFidelity,
    IdempotencyKey,
    ImageReferenceArg,
    ModelName,
    NegativePrompt,
    NumImages,
    Prompt,
    RefImageUrl,
    RefImageWeight,
    ResolutionArg,
    TaskStatus,
    WaitSeconds,
)
from app.observability import Waiting, tool_call
from app.previews import NoPreview, Preview, PreviewMaker
from app.tasks import ProgressCallback, TaskRecord

INSTRUCTIONS = (
    "Generates images with Kling AI. Call generate_image with a prompt; it waits for the images and returns "
    "their URLs. If the images are not ready in time it returns a task_id: call check_image_status with it."
)
MCP_PATH = "/mcp"
SSE_PATH = "/sse"
MESSAGE_PATH = "/messages/"
IncludePreview = Annotated[
    bool,
    Field(description="Also return a small inline preview of each image, so the conversation shows it."),
]
_STATUS_TEXT = {
    TaskStatus.SUBMITTED: "queued at Kling",
    TaskStatus.PROCESSING: "generating",
    TaskStatus.SUCCEEDED: "done",
    TaskStatus.FAILED: "failed",
}


def task_result(outcome: Outcome, previews: list[ContentBlock] | None = None) -> CallToolResult:
    """Images as resource links (and `previews`, if any), the task as structured content, and a short text
    for the model."""
    record = outcome.record
    view = outcome.view()
    structured = view.model_dump(mode="json", exclude_none=True)
    if record.status is TaskStatus.FAILED:
        reason = record.status_message or "no reason given"
        text = f"Kling could not generate the images for task {record.task_id}: {reason}."
        return CallToolResult(is_error=True, content=[TextContent(text=text)], structured_content=structured)
    if record.status is TaskStatus.SUCCEEDED:
        text = f"Generated {len(view.images)} image(s) for task {record.task_id}:\n" + "\n".join(
            image.url for image in view.images
        )
        if view.images_expire_at is not None:
            text += f"\nKling deletes them after {view.images_expire_at:%Y-%m-%d}; download them before then."
    else:
        text = (
            f"Task {record.task_id} is still {_STATUS_TEXT[record.status]}. Call check_image_status with "
            f'task_id="{record.task_id}" to wait for the images; do not call generate_image again.'
        )
    content: list[ContentBlock] = [TextContent(text=text)]
    content += [
        ResourceLink(
            uri=image.url,
            name=f"{record.task_id}-{image.index}.png",
            title=f"Image {image.index + 1} of task {record.task_id}",
            mime_type="image/png",
        )
        for image in view.images
    ]
    content += previews or []
    content.append(TextContent(text=json.dumps(structured)))
    return CallToolResult(content=content, structured_content=structured)


def preview_blocks(previews: list[Preview | NoPreview]) -> list[ContentBlock]:
    blocks: list[ContentBlock] = []
    for preview in previews:
        if isinstance(preview, Preview):
            blocks.append(ImageContent(data=preview.base64(), mime_type=preview.mime_type))
        else:
            text = f"Preview of image {preview.index + 1} unavailable: {preview.reason}. Its link above still works."
            blocks.append(TextContent(text=text))
    return blocks


def progress_reporter(ctx: Context) -> ProgressCallback:
    """Report each poll as MCP progress; values must strictly increase, so they count reports."""
    reports = 0

    async def report(record: TaskRecord, elapsed_s: float) -> None:
        nonlocal reports
        reports += 1
        await ctx.report_progress(reports, None, f"{_STATUS_TEXT[record.status]} ({elapsed_s:.0f} s)")

    return report


def _caller() -> Principal:
    principal = current_principal.get()
    if principal is None:
        raise Unauthorized()
    return principal


async def _run_tool(tool: str, work: Callable[[], Awaitable[Outcome]], previews: PreviewMaker | None) -> CallToolResult:
    """Run a tool body, turning every failure a model can act on into an `isError` result; with a preview
    maker, a finished task's images are also shown inline."""
    try:
        outcome = await tool_call(tool, work)  # counted, timed and named on the request's log line
    except KNOWN_ERRORS as exc:
        error = gateway_error_from(exc)
        assert error is not None
        return tool_error_result(error)
    if previews is None or outcome.record.status is not TaskStatus.SUCCEEDED:
        return task_result(outcome)
    with Waiting(waiter=False):  # downloading images is time spent on others' servers, not the gateway's work
        made = await previews.make(outcome.view().images)
    return task_result(outcome, preview_blocks(made))


def declares_param_headers(input_schema: dict[str, Any]) -> bool:
    """Whether a tool's input schema has a valid `x-mcp-header` annotation: only then can a call's
    `Mcp-Param-*` headers be checked against it (the SDK checks nothing against a schema with invalid ones)."""
    return find_invalid_x_mcp_header(input_schema) is None and bool(x_mcp_header_map(input_schema))


class GatewayMCPServer(MCPServer):
    """The SDK's server, checking a 2026-era call's `Mcp-Param-*` headers only for a tool that declares some.

    Before each such `tools/call` the SDK compares those headers with the tool's `x-mcp-header` annotations,
    walking the tool's whole input schema twice to find them: 0.1 ms of CPU per call for generate_image's, which
    has none, as no tool here has. A tool without them can fail no such check, so its schema is not handed to
    it (the SDK then skips the check); whether a tool declares any is read once per schema. The lookup overridden
    is the SDK's own, private: should it be renamed, every call is checked again as before, at the old cost."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_schemas: dict[str, tuple[dict[str, Any], bool]] = {}

    def _tool_input_schema(self, name: str) -> dict[str, Any] | None:
        schema = super()._tool_input_schema(name)
        if schema is None:
            return None
        known = self._header_schemas.get(name)
        if known is None or known[0] is not schema:  # a tool replaced under the same name is read again
            known = self._header_schemas[name] = (schema, declares_param_headers(schema))
        return schema if known[1] else None


def drop_sdk_spans(mcp: MCPServer) -> None:
    """Take the SDK's span middleware out of `mcp`'s chain (its docs: "Drop it from this list to opt out")."""
    mcp.middleware[:] = [layer for layer in mcp.middleware if not isinstance(layer, OpenTelemetryMiddleware)]


def build_mcp_server(
    service: ImageService, *, default_wait_s: int, previews: PreviewMaker, traced: bool = False
) -> MCPServer:
    """The gateway's MCP server; `traced`: the SDK also makes a span of each MCP message (under the gateway's span
    of its HTTP request). Untraced, the SDK's span middleware, on by default and "a no-op until an exporter is
    installed", is dropped as the SDK allows: it still builds a span context and attributes for every message
    (16 µs each here), and its context managers stay alive for as long as a caller waits."""
    mcp = GatewayMCPServer(
        "kling-gateway", title="Kling image generation", instructions=INSTRUCTIONS, version=__version__
    )
    if not traced:
        drop_sdk_spans(mcp)
    annotations = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=True)

    @mcp.tool(title="Generate images with Kling", annotations=annotations, structured_output=False)
    async def generate_image(
        prompt: Prompt,
        ctx: Context,
        negative_prompt: NegativePrompt = None,
        model_name: ModelName | None = None,
        aspect_ratio: AspectRatioArg = "16:9",
        num_images: NumImages = 1,
        ref_image_url: RefImageUrl = None,
        ref_image_weight: RefImageWeight = None,
        image_reference: ImageReferenceArg = None,
        human_fidelity: HumanFidelity = None,
        resolution: ResolutionArg = None,
        wait_seconds: WaitSeconds = None,
        idempotency_key: IdempotencyKey = None,
        include_preview: IncludePreview = False,
    ) -> CallToolResult:
        """Generate images from a text prompt (optionally guided by a reference image) with Kling AI.

        Waits up to wait_seconds (default 45) for the images and returns their URLs. If they are not
        ready by then, returns a task_id: call check_image_status with it rather than generating again.
        Each call is billed to the caller's Kling account; to retry safely, pass the same idempotency_key.
        With include_preview, the result also shows each image inline, downscaled.
        """
        arguments = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "model_name": model_name,
            "aspect_ratio": aspect_ratio,
            "num_images": num_images,
            "ref_image_url": ref_image_url,
            "ref_image_weight": ref_image_weight,
            "image_reference": image_reference,
            "human_fidelity": human_fidelity,
            "resolution": resolution,
            "wait_seconds": wait_seconds,
            "idempotency_key": idempotency_key,
        }

        async def work() -> Outcome:
            request = GenerateRequest.model_validate({k: v for k, v in arguments.items() if v is not None})
            wait_s = default_wait_s if request.wait_seconds is None else request.wait_seconds
            return await service.generate(_caller(), request, wait_s=wait_s, on_progress=progress_reporter(ctx))

        return await _run_tool("generate_image", work, previews if include_preview else None)

    @mcp.tool(
        title="Check a Kling image task",
        annotations=ToolAnnotations(read_only_hint=True, open_world_hint=True),
        structured_output=False,
    )
    async def check_image_status(
        task_id: str, ctx: Context, wait_seconds: WaitSeconds = None, include_preview: IncludePreview = False
    ) -> CallToolResult:
        """Get the status and image URLs of a task started by generate_image.

        Waits up to wait_seconds (default 45) for the task to finish before answering. With include_preview,
        the result also shows each image inline, downscaled.
        """

        async def work() -> Outcome:
            wait_s = default_wait_s if wait_seconds is None else wait_seconds
            return await service.status(_caller(), task_id, wait_s=wait_s, on_progress=progress_reporter(ctx))

        return await _run_tool("check_image_status", work, previews if include_preview else None)

    return mcp


def legacy_sse_app(
    mcp: MCPServer, authenticator: Authenticator, security: TransportSecuritySettings, max_body_bytes: int
) -> ASGIApp:
    """The deprecated HTTP+SSE transport (`GET /sse`, then `POST /messages/?session_id=...`), behind the same
    authentication and Host/Origin checks as `/mcp`."""
    app = mcp.sse_app(
        sse_path=SSE_PATH, message_path=MESSAGE_PATH, max_request_body_size=max_body_bytes, transport_security=security
    )
    return McpAuthMiddleware(LegacySessionGuard(app, security), authenticator)


class LegacySessionGuard:
    """Pure ASGI, behind McpAuthMiddleware, in front of the SDK's SSE transport.

    - It names the caller in `scope["user"]`, which the transport binds a session to when `GET /sse` opens
      it: a message posted to the session with any other key (another tenant's, or another key of the same
      tenant) is answered 404, as if the session did not exist. A tool then runs with the principal of the
      POST that carried the call (the SDK runs each message in its sender's context): the session owner's.
    - It answers a `GET /sse` with a foreign Host or Origin itself (421/403): the transport would answer it
      too, but then raise, and every refused request would be logged as a server error.
    """

    def __init__(self, app: ASGIApp, security: TransportSecuritySettings) -> None:
        self._app = app
        self._security = TransportSecurityMiddleware(security)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = current_principal.get()
        if principal is not None:
            access = AccessToken(token="", client_id=principal.tenant.id, subject=principal.key_id, scopes=[])
            scope["user"] = AuthenticatedUser(access)
        if scope["type"] == "http" and scope["method"] == "GET":
            refused = await self._security.validate_request(Request(scope, receive), is_post=False)
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self._app(scope, receive, send)


class McpTransports:
    """Pure ASGI, outside the REST app: `/mcp` goes to streamable HTTP, the legacy SSE paths to that transport,
    and every other path to `app` (FastAPI: the REST routes, their guard and error handlers). The transports
    answer their own errors and need none of FastAPI's routing, which would cost an MCP call a tenth of a
    millisecond of CPU (py-spy) before reaching them."""

    def __init__(self, app: ASGIApp, streamable: ASGIApp, legacy: ASGIApp | None) -> None:
        self._app = app
        self._streamable = streamable
        self._legacy = legacy or LEGACY_SSE_OFF

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if path == MCP_PATH or path.startswith(MCP_PATH + "/"):
            await self._streamable(scope, receive, send)
        elif path == SSE_PATH or path.startswith(MESSAGE_PATH):
            await self._legacy(scope, receive, send)
        else:
            await self._app(scope, receive, send)


# Sessions of the legacy transport live in one process: with several workers it is off (`KGW_LEGACY_SSE`).
LEGACY_SSE_OFF = JSONResponse(
    {"error": {"type": "not_found", "message": "the legacy HTTP+SSE transport is off on this server; "
               "connect with streamable HTTP at /mcp"}},
    status_code=404,
)  # fmt: skip
