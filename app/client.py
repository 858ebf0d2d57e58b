"""A small REST client of the gateway, behind `kling-gateway generate`: submit, follow, download.

It follows the task on its events stream (`GET /tasks/{task_id}/events`); if the stream ends before the
task does (a proxy or a restarting replica closed it), one long poll of `GET /tasks/{task_id}` bridges the
gap before streaming again. On a terminal a live display shows the status and the elapsed time; otherwise
each new status is one line on stderr. Stdout gets only the paths of the saved images.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx2
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

TERMINAL = ("succeeded", "failed")
STATUS_WAIT_S = 20
STATUS_TEXT = {"submitted": "queued at Kling", "processing": "generating", "succeeded": "done", "failed": "failed"}


class GatewayCallFailed(Exception):
    pass


class StatusDisplay(Protocol):
    def show(self, task: dict[str, Any]) -> None:
        """The task as last seen."""

    def note(self, text: str) -> None:
        """What the client does now that the task has ended."""


class StatusLines:
    """One line on stderr per new status: for logs, pipes and CI."""

    def __init__(self) -> None:
        self._started = time.monotonic()
        self._last: str | None = None

    def show(self, task: dict[str, Any]) -> None:
        if task["status"] != self._last:
            self._last = task["status"]
            elapsed = time.monotonic() - self._started
            print(f"task {task['task_id']}: {self._last} ({elapsed:.0f} s)", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


class ProgressDisplay:
    """One live row on the terminal: spinner, task, bar, status and elapsed time (rich redraws the clock)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._row = progress.add_task("submitting", total=None, status="")

    def show(self, task: dict[str, Any]) -> None:
        status = task["status"]
        text = STATUS_TEXT.get(status, status)
        if status == "failed" and task.get("status_message"):
            text = f"failed: {task['status_message']}"
        ended = status in TERMINAL
        self._progress.update(
            self._row, description=f"task {task['task_id']}", status=text, total=1 if ended else None, completed=ended
        )

    def note(self, text: str) -> None:
        self._progress.update(self._row, status=text)


@contextlib.contextmanager
def status_display(interactive: bool) -> Iterator[StatusDisplay]:
    if not interactive:
        yield StatusLines()
        return
    columns = (
        SpinnerColumn(finished_text="✓"),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        yield ProgressDisplay(progress)


def _task_or_raise(response: httpx2.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400 or not isinstance(body, dict):
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise GatewayCallFailed(f"HTTP {response.status_code}: {error.get('message', response.text[:200])}")
    return body


async def follow_task(http: httpx2.AsyncClient, task: dict[str, Any], display: StatusDisplay) -> dict[str, Any]:
    """Follow the task until it ends, showing each status."""
    display.show(task)
    while task["status"] not in TERMINAL:
        task = await _follow_events(http, task, display)
        if task["status"] not in TERMINAL:
            task = _task_or_raise(await http.get(f"/tasks/{task['task_id']}", params={"wait_seconds": STATUS_WAIT_S}))
            display.show(task)
    return task


async def _follow_events(http: httpx2.AsyncClient, task: dict[str, Any], display: StatusDisplay) -> dict[str, Any]:
    """The task as the events stream last showed it, when the stream ends."""
    async with http.stream("GET", f"/tasks/{task['task_id']}/events") as response:
        if response.status_code >= 400:
            await response.aread()
            _task_or_raise(response)
        async for data in status_events(response):
            try:
                task = json.loads(data)
            except ValueError as exc:
                raise GatewayCallFailed("the events stream sent malformed data") from exc
            display.show(task)
    return task


async def status_events(response: httpx2.Response) -> AsyncIterator[str]:
    """The data of each `status` server-sent event; heartbeat comments and other events are skipped."""
    event = "message"
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if event == "status" and data:
                yield "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").removeprefix(" "))


async def download_images(http: httpx2.AsyncClient, task: dict[str, Any], out_dir: Path) -> list[Path]:
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    paths = []
    for image in task["images"]:
        # Image URLs point at Kling's CDN, not at the gateway: send no gateway key there.
        response = await http.get(image["url"], headers={"Authorization": ""})
        response.raise_for_status()
        path = out_dir / f"{task['task_id']}-{image['index']}.png"
        await asyncio.to_thread(path.write_bytes, response.content)
        paths.append(path)
    return paths


async def generate_and_download(
    base_url: str, api_key: str, arguments: dict[str, Any], out_dir: str, *, timeout_s: float, interactive: bool
) -> int:
    """Returns the process exit code: 0 when the images were saved, 1 otherwise."""
    headers = {"Authorization": f"Bearer {api_key}"}
    timeout = httpx2.Timeout(10.0, read=STATUS_WAIT_S + 30.0)
    async with httpx2.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, trust_env=False) as http:
        try:
            with status_display(interactive) as display:
                async with asyncio.timeout(timeout_s):
                    # One idempotency key for this run: a retried submit never pays for a second task.
                    submitted = await http.post(
                        "/generate",
                        json={**arguments, "wait_seconds": 0},
                        headers={"Idempotency-Key": str(uuid.uuid4())},
                    )
                    task = await follow_task(http, _task_or_raise(submitted), display)
                    if task["status"] == "failed":
                        print(f"error: Kling failed the task: {task.get('status_message')}", file=sys.stderr)
                        return 1
                    display.note(f"downloading {len(task['images'])} image(s)")
                    paths = await download_images(http, task, Path(out_dir))
                    display.note(f"saved {len(paths)} image(s)")
        except (GatewayCallFailed, httpx2.HTTPError, TimeoutError) as exc:
            print(f"error: {exc or type(exc).__name__}", file=sys.stderr)
            return 1
    for path in paths:
        print(path)
    return 0
