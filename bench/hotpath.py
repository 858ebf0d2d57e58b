"""Profile of the hottest path, `POST /generate` with wait 0 (memory store), with pyinstrument inside the
gateway process, recording only while the requests run.

    python -m bench.hotpath [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx2
from pyinstrument.frame import Frame
from pyinstrument.session import Session

from bench.measure import closed_loop
from bench.overhead import rest_sender
from bench.probes import PROFILE_INTERVAL_S, PROFILE_PATH
from bench.report import Finding, write_section, write_summary
from bench.serving import enter_together, raise_fd_limit
from bench.stack import FULL, TLS, SimulatorProcess, accounts_for, api_keys, gateway

CLIENTS = 16
PROFILED_FACTORY = "bench.probes:profiled_gateway"
EXTRA_ENV: dict[str, str] = {}
TOP = 15
# Where the worker's time goes that a fix would target: (label, function, a fragment of its file's path).
SPOTS = (
    ("Kling calls, all (`KlingClient._send`)", "_send", "app/kling.py"),
    ("creates (`create_image_task`)", "create_image_task", "app/kling.py"),
    ("status polls of followed tasks, one by one (`get_image_task`)", "get_image_task", "app/kling.py"),
    ("status polls gathered per account (`list_image_tasks`)", "list_image_tasks", "app/kling.py"),
    ("httpcore2's pool scan on each request and response (`_assign_requests_to_connections`)",
     "_assign_requests_to_connections", "httpcore2"),
    ("logging", "handle", "logging/__init__"),
)  # fmt: skip
_PACKAGE = re.compile(r"site-packages/([A-Za-z0-9_]+)|^/.*?/(app|bench)/[^/]+\.py$|python3\.\d+/([A-Za-z0-9_]+)")


def frames(frame: Frame) -> Iterator[Frame]:
    yield frame
    for child in frame.children:
        yield from frames(child)


def self_time(frame: Frame) -> float:
    return frame.time - sum(child.time for child in frame.children if not child.is_synthetic)


def where(frame: Frame) -> str:
    """The package a frame's code belongs to: `app`, a third-party distribution, or a stdlib module."""
    path = frame.file_path or ""
    match = _PACKAGE.search(path[path.find("site-packages") :] if "site-packages" in path else path)
    if match is None:
        return "<built-in>" if (frame.file_path or "").startswith("<") else "other"
    return next(group for group in match.groups() if group)


def summarize(session: Session, requests: int) -> tuple[str, Finding]:
    """The profile's tables, and the summary's row: the share of the worker's time in Kling calls and in the
    gateway's own code."""
    root = session.root_frame()
    assert root is not None
    real = [frame for frame in frames(root) if not frame.is_synthetic]
    by_frame: defaultdict[str, float] = defaultdict(float)
    by_package: defaultdict[str, float] = defaultdict(float)
    inclusive_app: defaultdict[str, float] = defaultdict(float)
    for frame in real:
        name = f"`{frame.function}` ({frame.file_path_short}:{frame.line_no})"
        by_frame[name] += self_time(frame)
        by_package[where(frame)] += self_time(frame)
        if where(frame) == "app" and not _has_ancestor(frame, frame.function, frame.file_path):
            inclusive_app[name] += frame.time
    total = root.time
    spots = spot_seconds(real)
    per_request_ms = session.duration / requests * 1000
    finding = Finding("Where `POST /generate` (wait 0) spends one worker's time, 16 clients (pyinstrument)",
                      f"Kling calls {spots[SPOTS[0][0]] / total:.0%}, the gateway's own code "
                      f"{by_package['app'] / total:.0%} (self time); {per_request_ms:.2f} ms of wall time per request")  # fmt: skip
    spot_rows = "\n".join(f"| {label} | {spots[label] / total:.1%} | {spots[label] / requests * 1000:.3f} |"
                          for label, _, _ in SPOTS)  # fmt: skip
    frame_rows = "\n".join(f"| {name} | {seconds / total:.1%} |" for name, seconds in _top(by_frame))
    package_rows = "\n".join(f"| {name} | {seconds / total:.1%} |" for name, seconds in _top(by_package))
    app_rows = "\n".join(f"| {name} | {seconds / total:.1%} | {seconds / requests * 1000:.3f} |"
                         for name, seconds in _top(inclusive_app))  # fmt: skip
    text = f"""Sampled {session.sample_count:,} stacks over {session.duration:.1f} s ({requests:,} requests, \
{per_request_ms:.2f} ms of the worker's wall time per request).

What a fix would target (inclusive time, share of all samples):

| part | share | ms per request |
|---|---|---|
{spot_rows}

Where the time goes, by package (self time, share of all samples):

| package | share |
|---|---|
{package_rows}

Top frames by self time:

| frame | share |
|---|---|
{frame_rows}

Gateway functions by inclusive time (a function's share includes what it calls):

| function | share | ms per request |
|---|---|---|
{app_rows}"""
    return text, finding


def spot_seconds(real: list[Frame]) -> defaultdict[str, float]:
    """Inclusive seconds in each of SPOTS (an outermost call each, so recursion counts once)."""
    spots: defaultdict[str, float] = defaultdict(float)
    for frame in real:
        for label, function, path in SPOTS:
            if (
                frame.function == function
                and path in (frame.file_path or "")
                and not _has_ancestor(frame, function, frame.file_path)
            ):
                spots[label] += frame.time
    return spots


def _top(seconds: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(seconds.items(), key=lambda item: -item[1])[:TOP]


def _has_ancestor(frame: Frame, function: str, path: str | None) -> bool:
    parent = frame.parent
    while parent is not None:
        if parent.function == function and parent.file_path == path:
            return True
        parent = parent.parent
    return False


async def main(quick: bool, save: str | None = None) -> str:
    raise_fd_limit()
    requests, warm_up = (200, 100) if quick else (1500, 300)
    accounts = accounts_for(4000)
    with tempfile.TemporaryDirectory() as workdir:
        out = Path(workdir) / "profile.json"
        kling = SimulatorProcess(FULL.task_s, accounts)
        profiled = gateway(kling.url, factory=PROFILED_FACTORY, extra_env={"BENCH_PROFILE_OUT": str(out), **EXTRA_ENV})
        async with contextlib.AsyncExitStack() as stack:
            _, gw = await enter_together(stack, kling, profiled)
            send = rest_sender(await api_keys(gw.url, accounts))
            await closed_loop(gw.url, send, clients=CLIENTS, requests=warm_up, expect=202)
            async with httpx2.AsyncClient(timeout=30, verify=TLS) as http:
                (await http.post(gw.url + PROFILE_PATH)).raise_for_status()
                run = await closed_loop(gw.url, send, clients=CLIENTS, requests=requests, expect=202)
                (await http.delete(gw.url + PROFILE_PATH)).raise_for_status()
        session = Session.load(out)
        if save:
            session.save(save)
    tables, finding = summarize(session, requests)
    command = "python -m bench.hotpath" + (" --quick" if quick else "")
    body = f"""## Profile of `POST /generate`, wait 0 (`{command}`)

Run {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}. pyinstrument (every {PROFILE_INTERVAL_S * 1000:g} ms, all of the event
loop's thread) inside one gateway worker (memory store) while {CLIENTS} clients sent {requests:,} requests
({run.per_second:,.0f}/s, p50 {run.p50_ms:.1f} ms under the profiler). Time in `<built-in>` and `asyncio`/`uvloop`
frames includes the loop waiting for sockets; the rest is the worker's CPU. pyinstrument's hook runs at every Python
call and return, which slows code made of many small calls more than the rest, so such code reads larger here than
it costs: httpcore2's pool scan, 15% of this profile on 2026-11-26, was 4.5% of the samples py-spy (which samples
from outside the process, without a hook) took of the same load (16 clients, memory store) on the same day.

{tables}
"""
    write_section("profile", body)
    write_summary("profile", [finding], quick=quick)
    return body


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--save", help="also keep the pyinstrument session here (open: pyinstrument --load FILE)")
    args = parser.parse_args()
    print(asyncio.run(main(args.quick, args.save)))
