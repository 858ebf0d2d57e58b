"""A small REST client of the gateway, behind `kling-gateway generate`: submit, follow, download."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx2

TERMINAL = ("succeeded", "failed")
STATUS_WAIT_S = 20


class GatewayCallFailed(Exception):
    pass


def _task_or_raise(response: httpx2.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400 or not isinstance(body, dict):
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise GatewayCallFailed(f"HTTP {response.status_code}: {error.get('message', response.text[:200])}")
    return body


async def follow_task(http: httpx2.AsyncClient, task: dict[str, Any]) -> dict[str, Any]:
    """Ask the gateway to wait on the task, repeatedly, printing each new status, until it ends."""
    last_status = None
    while True:
        if task["status"] != last_status:
            last_status = task["status"]
            print(f"task {task['task_id']}: {last_status}", file=sys.stderr, flush=True)
        if task["status"] in TERMINAL:
            return task
        response = await http.get(f"/tasks/{task['task_id']}", params={"wait_seconds": STATUS_WAIT_S})
        task = _task_or_raise(response)


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
    base_url: str, api_key: str, arguments: dict[str, Any], out_dir: str, *, timeout_s: float
) -> int:
    """Returns the process exit code: 0 when the images were saved, 1 otherwise."""
    headers = {"Authorization": f"Bearer {api_key}"}
    timeout = httpx2.Timeout(10.0, read=STATUS_WAIT_S + 30.0)
    async with httpx2.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, trust_env=False) as http:
        try:
            async with asyncio.timeout(timeout_s):
                # One idempotency key for this run: a retried submit never pays for a second task.
                submitted = await http.post(
                    "/generate", json={**arguments, "wait_seconds": 0}, headers={"Idempotency-Key": str(uuid.uuid4())}
                )
                task = await follow_task(http, _task_or_raise(submitted))
                if task["status"] == "failed":
                    print(f"error: Kling failed the task: {task.get('status_message')}", file=sys.stderr)
                    return 1
                for path in await download_images(http, task, Path(out_dir)):
                    print(path)
        except (GatewayCallFailed, httpx2.HTTPError, TimeoutError) as exc:
            print(f"error: {exc or type(exc).__name__}", file=sys.stderr)
            return 1
    return 0
