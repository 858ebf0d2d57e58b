"""Small inline previews of generated images, for MCP results asked for with `include_preview`.

The images are downloaded from the URLs Kling returned, with a deadline and a size cap, decoded by Pillow
behind a pixel cap (and Pillow's own decompression-bomb guard), downscaled, and encoded as JPEG or PNG,
whichever is smaller. All previews of one result share a byte budget that keeps the result far below the
1 MiB the MCP Python client accepts in one server-sent event (reference/mcp-sdk.md §5): each image gets
its share of what is left, and one that cannot be made small enough is left out with a reason. A preview
that cannot be made never fails the call: the images exist whether or not they can be previewed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import httpx2
from PIL import Image

from app.models import ImageView

logger = logging.getLogger(__name__)

DECODERS = ("PNG", "JPEG", "WEBP")  # what Kling serves; no other Pillow plugin ever parses a download
JPEG_QUALITY = 80
SIDE_STEP = 0.75  # each retry scales the longest side by this


@dataclass(frozen=True)
class PreviewLimits:
    max_side: int = 768  # longest side of a preview, in pixels
    min_side: int = 96  # below this a preview shows nothing useful
    max_preview_bytes: int = 512 * 1024  # one preview, as an image file (less than this)
    budget_bytes: int = 600_000  # base64 of all previews of one result, well below the client's 1 MiB per event
    max_download_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000  # refused before decoding (Kling's largest images are a fraction of this)
    timeout_s: float = 10.0  # to download one image, start to end


@dataclass(frozen=True)
class Preview:
    index: int
    data: bytes
    mime_type: str

    def base64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")


@dataclass(frozen=True)
class NoPreview:
    index: int
    reason: str


class PreviewFailed(Exception):
    """The preview of one image cannot be made; the message says why, for the person reading the result."""


MAX_RESULTS_AT_ONCE = 2  # results previewed at once: downloads held in memory stay under 2 x 9 x the cap


def encoded_size(data: bytes) -> int:
    """How many bytes `data` takes in a result, as base64."""
    return 4 * ((len(data) + 2) // 3)


class PreviewMaker:
    def __init__(self, http: httpx2.AsyncClient, limits: PreviewLimits | None = None) -> None:
        self._http = http
        self._limits = limits or PreviewLimits()
        # Decoding and encoding are CPU work in threads: a few at a time, so previews never starve the loop's
        # other work of cores, nor hold many decoded images in memory at once.
        self._cpu = anyio.CapacityLimiter(2)
        # Every image of a result is downloaded at once and held until rendered: bounding the results in the
        # making bounds the memory (and fits their downloads in the pool, so none waits out a pool timeout).
        self._results = asyncio.Semaphore(MAX_RESULTS_AT_ONCE)

    async def make(self, images: Sequence[ImageView]) -> list[Preview | NoPreview]:
        """One preview (or the reason there is none) per image, in order; never raises for an image."""
        async with self._results:
            return await self._make(images)

    async def _make(self, images: Sequence[ImageView]) -> list[Preview | NoPreview]:
        downloads = await asyncio.gather(*(self._download(image.url) for image in images), return_exceptions=True)
        results: list[Preview | NoPreview] = []
        budget = self._limits.budget_bytes
        for position, (image, downloaded) in enumerate(zip(images, downloads, strict=True)):
            # Each image may use its share of what is left, so small early previews leave more for later ones.
            share = budget // (len(images) - position)
            try:
                preview = await self._render(image.index, _downloaded_or_raise(downloaded), share)
            except PreviewFailed as exc:
                results.append(NoPreview(image.index, str(exc)))
                continue
            budget -= encoded_size(preview.data)
            results.append(preview)
        return results

    async def _download(self, url: str) -> bytes:
        if not url.startswith(("https://", "http://")):
            raise PreviewFailed("the image URL is not http(s)")
        try:
            async with asyncio.timeout(self._limits.timeout_s):
                return await self._read_capped(url)
        except TimeoutError as exc:
            raise PreviewFailed("the image did not download in time") from exc
        except (httpx2.HTTPError, httpx2.InvalidURL, httpx2.StreamError) as exc:
            logger.info("preview download failed: %s", type(exc).__name__)
            raise PreviewFailed("the image could not be downloaded") from exc

    async def _read_capped(self, url: str) -> bytes:
        cap = self._limits.max_download_bytes
        too_large = PreviewFailed(f"the image is larger than {cap // (1024 * 1024)} MiB")
        async with self._http.stream("GET", url) as response:
            response.raise_for_status()
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cap:
                raise too_large
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > cap:
                    raise too_large
                chunks.append(chunk)
        return b"".join(chunks)

    async def _render(self, index: int, data: bytes, share_bytes: int) -> Preview:
        return await anyio.to_thread.run_sync(self._render_sync, index, data, share_bytes, limiter=self._cpu)

    def _render_sync(self, index: int, data: bytes, share_bytes: int) -> Preview:
        try:
            with Image.open(io.BytesIO(data), formats=DECODERS) as image:
                if image.width * image.height > self._limits.max_pixels:
                    raise PreviewFailed(f"the image has more than {self._limits.max_pixels} pixels")
                # Down to the largest preview size first: JPEGs decode straight at a fraction of full size.
                image.thumbnail((self._limits.max_side, self._limits.max_side))
                return self._largest_fitting(index, _normalized(image), share_bytes)
        except PreviewFailed:
            raise
        except Exception as exc:
            # Pillow reports broken or hostile files with many exception types (OSError, SyntaxError,
            # DecompressionBombError, ValueError, ...); any of them only means there is no preview.
            logger.info("preview decoding failed: %s", type(exc).__name__)
            raise PreviewFailed("the image could not be decoded") from exc

    def _largest_fitting(self, index: int, image: Image.Image, share_bytes: int) -> Preview:
        """The largest preview under the per-preview cap whose base64 fits `share_bytes` of the budget."""
        side = max(image.size)
        while True:
            thumbnail = image.copy()
            thumbnail.thumbnail((side, side))
            data, mime_type = min(_encodings(thumbnail), key=lambda encoded: len(encoded[0]))
            if len(data) < self._limits.max_preview_bytes and encoded_size(data) <= share_bytes:
                return Preview(index, data, mime_type)
            side = int(side * SIDE_STEP)
            if side < self._limits.min_side:
                raise PreviewFailed("left out to keep the result small enough for chat clients")


def _downloaded_or_raise(downloaded: bytes | BaseException) -> bytes:
    if isinstance(downloaded, BaseException):
        raise downloaded  # a PreviewFailed, or the cancellation of this call
    return downloaded


def _normalized(image: Image.Image) -> Image.Image:
    """RGB, or RGBA when the image has transparency: modes every encoder here accepts."""
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    return image.convert("RGBA" if has_alpha else "RGB")


def _encodings(image: Image.Image) -> list[tuple[bytes, str]]:
    jpeg, png = io.BytesIO(), io.BytesIO()
    image.convert("RGB").save(jpeg, format="JPEG", quality=JPEG_QUALITY)
    image.save(png, format="PNG")
    return [(jpeg.getvalue(), "image/jpeg"), (png.getvalue(), "image/png")]
