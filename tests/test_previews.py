"""Inline previews (`include_preview`): through the official MCP client against the served gateway and
simulator, and the preview maker's limits against images served on loopback."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from mcp.types import CallToolResult, ImageContent, ResourceLink
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.http_pool import create_http_client
from app.models import ImageView
from app.previews import NoPreview, Preview, PreviewLimits, PreviewMaker, encoded_size
from tests.conftest import RunningGateway, Simulator, mcp_client, text_of
from tests.servers import serve

pytestmark = pytest.mark.anyio
PREVIEW_CAP = 512 * 1024
SSE_EVENT_CAP = 1024 * 1024  # the MCP Python client's limit on one server-sent event


def previews_of(result: CallToolResult) -> list[ImageContent]:
    return [block for block in result.content if isinstance(block, ImageContent)]


def decoded(preview: ImageContent) -> tuple[bytes, Image.Image]:
    """The preview's bytes and the image they decode to (fully: a truncated file raises)."""
    data = base64.b64decode(preview.data, validate=True)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
    return data, image


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_preview_is_a_decodable_image_under_512_kb_shown_beside_each_link(
    gateway: RunningGateway, mode: str
) -> None:
    api_key = await gateway.new_api_key("acme")
    async with mcp_client(gateway, api_key, mode) as client:
        with anyio.fail_after(30):
            result = await client.call_tool(
                "generate_image", {"prompt": "a lighthouse", "num_images": 2, "include_preview": True}
            )
    assert not result.is_error, text_of(result)
    assert len([block for block in result.content if isinstance(block, ResourceLink)]) == 2
    previews = previews_of(result)
    assert len(previews) == 2
    for preview in previews:
        data, image = decoded(preview)
        assert len(data) < PREVIEW_CAP
        assert preview.mime_type == {"JPEG": "image/jpeg", "PNG": "image/png"}[str(image.format)]
        assert max(image.size) <= 768
        assert image.width > image.height  # 16:9, downscaled whole
    assert isinstance(result.structured_content, dict)
    assert "include_preview" not in str(result.structured_content)


async def test_no_preview_is_sent_unless_asked_for(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("acme")
    async with mcp_client(gateway, api_key) as client:
        with anyio.fail_after(30):
            generated = await client.call_tool("generate_image", {"prompt": "a fox"})
            assert isinstance(generated.structured_content, dict)
            checked = await client.call_tool("check_image_status", {"task_id": generated.structured_content["task_id"]})
    for result in (generated, checked):
        assert not result.is_error, text_of(result)
        assert previews_of(result) == []
        assert "Preview" not in text_of(result)


async def test_nine_large_images_fit_one_result_well_below_the_clients_event_limit(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("big", concurrency=9)  # the default account runs five images at once
    arguments = {"prompt": "a lighthouse", "num_images": 9, "resolution": "2k", "include_preview": True}
    async with mcp_client(gateway, api_key) as client:
        with anyio.fail_after(60):
            result = await client.call_tool("generate_image", arguments)
    assert not result.is_error, text_of(result)
    assert len(previews_of(result)) == 9
    assert len(result.model_dump_json(by_alias=True)) < SSE_EVENT_CAP * 3 // 4


async def test_an_image_url_that_fails_still_gives_a_successful_result_saying_the_preview_is_unavailable(
    gateway: RunningGateway, simulator: Simulator
) -> None:
    api_key = await gateway.new_api_key("acme")
    async with mcp_client(gateway, api_key) as client:
        with anyio.fail_after(30):
            generated = await client.call_tool("generate_image", {"prompt": "a fox"})
        assert isinstance(generated.structured_content, dict)
        await simulator.control("reset", {})  # Kling forgets the task: its image URL now answers 404
        with anyio.fail_after(30):
            result = await client.call_tool(
                "check_image_status", {"task_id": generated.structured_content["task_id"], "include_preview": True}
            )
    assert not result.is_error, text_of(result)
    assert previews_of(result) == []
    assert "Preview of image 1 unavailable: the image could not be downloaded" in text_of(result)
    assert [block for block in result.content if isinstance(block, ResourceLink)]


async def test_include_preview_does_not_change_what_an_idempotency_key_replays(
    gateway: RunningGateway, simulator: Simulator
) -> None:
    api_key = await gateway.new_api_key("acme")
    arguments = {"prompt": "a fox", "idempotency_key": "run-1"}
    async with mcp_client(gateway, api_key) as client:
        with anyio.fail_after(30):
            first = await client.call_tool("generate_image", arguments)
            again = await client.call_tool("generate_image", {**arguments, "include_preview": True})
    assert not again.is_error, text_of(again)
    assert isinstance(first.structured_content, dict)
    assert isinstance(again.structured_content, dict)
    assert again.structured_content["task_id"] == first.structured_content["task_id"]
    assert len(previews_of(again)) == 1
    assert (await simulator.stats())["creates"] == 1


# --- the preview maker's limits, against images served on loopback ---


def noise_png(width: int, height: int, seed: int) -> bytes:
    """A photo-like worst case: random pixels compress badly in any format."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels in a few bytes: a decompression bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@asynccontextmanager
async def image_host(files: dict[str, bytes]) -> AsyncIterator[str]:
    async def serve_file(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in files:
            return Response(status_code=404)
        return Response(files[name], media_type="image/png")

    async with serve(Starlette(routes=[Route("/{name}", serve_file)])) as url:
        yield url


async def make_previews(url: str, names: list[str], limits: PreviewLimits) -> list[Preview | NoPreview]:
    http = create_http_client(max_connections=20)
    try:
        with anyio.fail_after(30):
            return await PreviewMaker(http, limits).make(
                [ImageView(index=i, url=f"{url}/{n}") for i, n in enumerate(names)]
            )
    finally:
        await http.aclose()


async def test_previews_of_photo_like_images_are_downscaled_to_share_the_budget() -> None:
    files = {f"{i}.png": noise_png(1024, 1024, seed=i) for i in range(4)}
    limits = PreviewLimits(budget_bytes=300_000)
    async with image_host(files) as url:
        previews = await make_previews(url, list(files), limits)
    made = [preview for preview in previews if isinstance(preview, Preview)]
    assert len(made) == 4
    assert sum(encoded_size(preview.data) for preview in made) <= limits.budget_bytes
    for preview in made:
        with Image.open(io.BytesIO(preview.data)) as image:
            image.load()
            assert max(image.size) < 768  # noise at full preview size would not have fit its share


async def test_an_image_that_cannot_fit_the_budget_is_left_out_with_a_reason() -> None:
    files = {f"{i}.png": noise_png(1024, 1024, seed=i) for i in range(3)}
    limits = PreviewLimits(budget_bytes=150_000, min_side=700)
    async with image_host(files) as url:
        previews = await make_previews(url, list(files), limits)
    assert [type(preview) for preview in previews] == [NoPreview] * 3
    assert all("left out" in preview.reason for preview in previews if isinstance(preview, NoPreview))


async def test_a_download_over_the_size_cap_is_refused() -> None:
    async with image_host({"big.png": noise_png(256, 256, seed=1)}) as url:
        [preview] = await make_previews(url, ["big.png"], PreviewLimits(max_download_bytes=10_000))
    assert isinstance(preview, NoPreview)
    assert "larger than" in preview.reason


async def test_an_image_claiming_too_many_pixels_is_refused_before_decoding() -> None:
    async with image_host({"bomb.png": png_header_only(8000, 8000)}) as url:
        [preview] = await make_previews(url, ["bomb.png"], PreviewLimits())
    assert isinstance(preview, NoPreview)
    assert preview.reason == "the image has more than 40000000 pixels"


async def test_a_file_that_is_not_an_image_gives_no_preview() -> None:
    async with image_host({"a.png": b"<html>not an image</html>"}) as url:
        [preview] = await make_previews(url, ["a.png"], PreviewLimits())
    assert isinstance(preview, NoPreview)
    assert preview.reason == "the image could not be decoded"


async def test_a_flat_graphic_is_previewed_as_png_and_a_photo_like_image_as_jpeg() -> None:
    flat = io.BytesIO()
    Image.new("RGB", (1024, 1024), (200, 30, 30)).save(flat, format="PNG")
    async with image_host({"flat.png": flat.getvalue(), "photo.png": noise_png(512, 512, seed=3)}) as url:
        previews = await make_previews(url, ["flat.png", "photo.png"], PreviewLimits())
    assert [preview.mime_type for preview in previews if isinstance(preview, Preview)] == ["image/png", "image/jpeg"]
