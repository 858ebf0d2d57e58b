"""MCP tools over ImageService: `generate_image` and `check_image_status`.

The server runs stateless with SSE responses (see reference/mcp-sdk.md §0): any replica serves any
request, in both protocol eras, and progress notifications can flow while a tool waits on Kling.
Failures a model can act on come back as results with `isError: true`, never as protocol errors.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.types import CallToolResult, ContentBlock, ResourceLink, TextContent, ToolAnnotations

from app import __version__
from app.auth import current_principal
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
from app.tasks import ProgressCallback, TaskRecord

INSTRUCTIONS = (
    "Generates images with Kling AI. Call generate_image with a prompt; it waits for the images and returns "
    "their URLs. If the images are not ready in time it returns a task_id: call check_image_status with it."
)
_STATUS_TEXT = {
    TaskStatus.SUBMITTED: "queued at Kling",
    TaskStatus.PROCESSING: "generating",
    TaskStatus.SUCCEEDED: "done",
    TaskStatus.FAILED: "failed",
}


def task_result(outcome: Outcome) -> CallToolResult:
    """Images as resource links, the task as structured content, and a short text for the model."""
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
    content.append(TextContent(text=json.dumps(structured)))
    return CallToolResult(content=content, structured_content=structured)


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


async def _run_tool(work: Callable[[], Awaitable[Outcome]]) -> CallToolResult:
    """Run a tool body, turning every failure a model can act on into an `isError` result."""
    try:
        return task_result(await work())
    except KNOWN_ERRORS as exc:
        error = gateway_error_from(exc)
        assert error is not None
        return tool_error_result(error)


def build_mcp_server(service: ImageService, *, default_wait_s: int) -> MCPServer:
    mcp = MCPServer("kling-gateway", title="Kling image generation", instructions=INSTRUCTIONS, version=__version__)
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
    ) -> CallToolResult:
        """Generate images from a text prompt (optionally guided by a reference image) with Kling AI.

        Waits up to wait_seconds (default 45) for the images and returns their URLs. If they are not
        ready by then, returns a task_id: call check_image_status with it rather than generating again.
        Each call is billed to the caller's Kling account; to retry safely, pass the same idempotency_key.
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

        return await _run_tool(work)

    @mcp.tool(
        title="Check a Kling image task",
        annotations=ToolAnnotations(read_only_hint=True, open_world_hint=True),
        structured_output=False,
    )
    async def check_image_status(task_id: str, ctx: Context, wait_seconds: WaitSeconds = None) -> CallToolResult:
        """Get the status and image URLs of a task started by generate_image.

        Waits up to wait_seconds (default 45) for the task to finish before answering.
        """

        async def work() -> Outcome:
            wait_s = default_wait_s if wait_seconds is None else wait_seconds
            return await service.status(_caller(), task_id, wait_s=wait_s, on_progress=progress_reporter(ctx))

        return await _run_tool(work)

    return mcp
