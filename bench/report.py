"""Writing results into docs/benchmarks.md: each benchmark owns one marked section of the file."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n`make bench` (3.5 to 7 minutes on a 2-core host, by its speed) or `make bench-quick` (about a minute: fewer\n"
    "repeats, 16 clients, 1,000 waiters) runs them all and rewrites this file; each section names the command that\n"
    "reruns it alone.\n"
)
PACKAGES = ("uvicorn", "uvloop", "httptools", "fastapi", "starlette", "pydantic", "mcp", "httpx2", "httpcore2", "redis",
            "pyinstrument")  # fmt: skip


# A Kling answer, as the gateway reads thousands: the fixed workload `host_speed_ms` times.
_KLING_ANSWER = {
    "code": 0, "message": "SUCCEED", "request_id": "5ff4c0b2-39c8-4f45-9b5e-2a9cf0a5e7de",
    "data": {"task_id": "781250138164375622", "task_status": "succeed", "task_status_msg": "",
             "created_at": 1722769557708, "updated_at": 1722769570081,
             "task_result": {"images": [{"index": 0, "url": "https://cdn.klingai.com/bs2/upload-kling-api/1.png"}]}},
}  # fmt: skip
SPEED_ROUNDS = 10_000


def host_speed_ms(repeats: int = 9) -> float:
    """CPU time of a fixed pure-Python workload, the least of `repeats` (the host's bursts of other work only ever
    add to it): SPEED_ROUNDS times, a Kling answer encoded and decoded as JSON, then its task's fields copied as
    text. It is the same on every run, so it tells how fast the host itself was; shared hosts differ twofold from
    one day to the next."""
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(SPEED_ROUNDS):
            data = json.loads(json.dumps(_KLING_ANSWER))["data"]
            _ = {key: f"{value}" for key, value in data.items()}
        samples.append((time.process_time() - started) * 1000)
    return min(samples)


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )  # fmt: skip
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False).stdout.split()
    redis_version = next((part.split("=", 1)[1] for part in redis if part.startswith("v=")), "?")
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory_gib:.0f} GiB, {platform.system()} {platform.release()}, "
        f"Python {sys.version.split()[0]}, redis-server {redis_version}, redis-py {version('redis')}, "
        f"uvicorn {version('uvicorn')}, fastapi {version('fastapi')}, mcp {version('mcp')}"
    )


def machine_section(command: str) -> str:
    """The machine and versions every figure in the file was measured with."""
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                            cwd=DOC.parent.parent).stdout.strip() or "?"  # fmt: skip
    versions = ", ".join(f"{name} {_version(name)}" for name in PACKAGES)
    return f"""## Machine (`{command}`)

- {machine()}.
- Packages: {versions}. Commit {commit} (plus any uncommitted changes).
- Host speed: a fixed pure-Python workload (bench/report.py `host_speed_ms`) took **{host_speed_ms():.0f} ms** of CPU
  (the least of 9). It does the same work on every run: compare it between two versions of this file before their
  absolute figures, which scale with it.
- Load average when the run started: {load}. **The machine has only {os.cpu_count()} cores**, shared by the client,
  the simulator, redis-server and the server under test (each server in its own process), and, while these figures
  were taken, by other work: absolute numbers are lower and noisier than on a dedicated machine. Comparisons are
  fair, though: each runs its baseline in the same run, alternating, and reports medians over the rounds.
"""


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def write_section(name: str, body: str, *, after: str | None = None, first: bool = False) -> None:
    """Replace the section between the markers for `name`; a new one goes after section `after` if there is one,
    else first (right under the header) if `first` or `after` is given, else at the end."""
    text = DOC.read_text() if DOC.exists() else ""
    start = text.find("<!-- ")
    sections = text[start:] if start >= 0 else ""  # the header as this code has it, sections as they are
    section = f"<!-- {name}:start -->\n{body.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    anchor = f"<!-- {after}:end -->"
    if pattern.search(sections):
        sections = pattern.sub(lambda _: section, sections)
    elif after is not None and anchor in sections:
        sections = sections.replace(anchor, f"{anchor}\n\n{section}", 1)
    elif first or after is not None:
        sections = f"{section}\n\n{sections}"
    else:
        sections = f"{sections.rstrip()}\n\n{section}\n"
    text = HEADER + "\n" + sections.strip() + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


@dataclass(frozen=True)
class Finding:
    """One row of the summary: a figure, the goal the issue sets for it ("" for none) and whether it is met."""

    measure: str
    result: str
    goal: str = ""
    met: bool | None = None  # None: no goal to meet


# The benchmarks whose findings the summary holds, in its order: the section each writes, and its command.
SUMMARY_SOURCES = {"overhead": "bench.overhead", "mcp": "bench.mcp_calls", "waiting": "bench.waiting",
                   "limiter": "bench.limiter", "profile": "bench.hotpath"}  # fmt: skip
_SUMMARY_HEAD = """## Summary

The goals against the figures below, one row per figure; each row names the benchmark that measured it and when
(a benchmark rerun alone updates its own rows). The **floor** is what any gateway on this stack pays: FastAPI and
the Kling call (with Redis, also a round trip before and one after it); "own work" is what this gateway adds over
it. The sections below hold every figure, its method and what limits it on this machine.

| measure | goal | result | met | measured by |
|---|---|---|---|---|
"""


def write_summary(section: str, findings: list[Finding], *, quick: bool) -> None:
    """Replace the summary's rows from the benchmark writing `section` with `findings`, keeping the others'."""
    text = DOC.read_text() if DOC.exists() else ""
    match = re.search(r"<!-- summary:start -->(.*?)<!-- summary:end -->", text, re.S)
    kept: dict[str, list[str]] = {name: [] for name in SUMMARY_SOURCES}
    for line in (match.group(1) if match else "").splitlines():
        source = next((name for name, command in SUMMARY_SOURCES.items() if f"| `{command}" in line), None)
        if source is not None and source != section:
            kept[source].append(line)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = SUMMARY_SOURCES[section] + (" --quick" if quick else "")
    kept[section] = [
        f"| {f.measure} | {f.goal or '–'} | {f.result} | {_met(f.met)} | `{command}`, {when} |" for f in findings
    ]
    rows = "\n".join(line for lines in kept.values() for line in lines)
    write_section("summary", _SUMMARY_HEAD + rows, after="machine")


def _met(met: bool | None) -> str:
    return "" if met is None else "yes" if met else "**no**"
