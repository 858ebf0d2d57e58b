"""Closed-loop and paced load, percentiles, and A/B alternation: the measuring shared by the benchmarks."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bench.http import Connection, Reply

T = TypeVar("T")
SERVER_TIMING = re.compile(r"gateway;dur=([0-9.]+)")


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (`fraction` in 0..1) of a non-empty sample."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


@dataclass(frozen=True)
class HostTicks:
    """The machine's CPU time so far, in clock ticks (/proc/stat): all of it, and the part the hypervisor ran
    something else while this virtual machine had work ("steal"). On a shared host steal comes in bursts: a
    core taken away for a few ms stalls whichever process was on it, and every request waiting on that process."""

    steal: int = 0
    total: int = 0

    @classmethod
    def now(cls) -> HostTicks:
        # user nice system idle iowait irq softirq steal (guest time is counted in user already)
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return cls(fields[7], sum(fields))

    def __sub__(self, other: HostTicks) -> HostTicks:
        return HostTicks(self.steal - other.steal, self.total - other.total)


@dataclass(frozen=True)
class Run:
    """One run: every counted request's latency, the wall time, any `Server-Timing: gateway` values, the
    server's CPU per request when it was measured (`bench.stack.with_server_cpu`), the host's CPU ticks over the
    run, steal included, and how many commands redis-server was slow to run meanwhile, when that was watched."""

    latencies_s: list[float]
    elapsed_s: float
    server_timings_ms: list[float] = field(default_factory=list)
    server_cpu_ms: float | None = None
    host: HostTicks = field(default_factory=HostTicks)
    # Per 1,000 requests sent (lead-in included), when its Redis was watched (`bench.stack.SlowCommands`).
    slow_redis_commands: float | None = None

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_s, 0.50) * 1000

    @property
    def per_second(self) -> float:
        return len(self.latencies_s) / self.elapsed_s


Send = Callable[[Connection, int], Awaitable[Reply]]


async def closed_loop(base_url: str, send: Send, *, clients: int, requests: int, expect: int) -> Run:
    """`clients` connections, each sending its next request as soon as the last is answered, until `requests`
    have been sent; `send(connection, index)` sends request `index`. Any status but `expect` fails the run."""
    return await _load(base_url, send, clients=clients, requests=requests, expect=expect, per_second=None)


async def paced(
    base_url: str, send: Send, *, clients: int, per_second: float, requests: int, expect: int, lead_in: int = 0
) -> Run:
    """`clients` connections sharing one fixed schedule of `per_second` requests in all (request i is due at
    i / per_second), so the server is measured below its saturation. A latency runs from the request's due
    time, so a request held back by a busy connection counts its wait (no coordinated omission). The first
    `lead_in` requests are sent on the schedule but not counted: they bring the server to its steady state."""
    return await _load(base_url, send, clients=clients, requests=lead_in + requests, expect=expect,
                       per_second=per_second, lead_in=lead_in)  # fmt: skip


async def _load(
    base_url: str, send: Send, *, clients: int, requests: int, expect: int, per_second: float | None, lead_in: int = 0
) -> Run:
    latencies: list[float] = []
    timings: list[float] = []
    next_index = 0
    ticks_before = HostTicks.now()
    started = time.perf_counter()
    counted_from = started + lead_in / per_second if per_second else started

    async def client() -> None:
        nonlocal next_index
        connection = Connection(base_url)
        try:
            while next_index < requests:
                index, next_index = next_index, next_index + 1
                due = time.perf_counter()
                if per_second is not None:
                    due = started + index / per_second
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                reply = await send(connection, index)
                answered = time.perf_counter()
                if reply.status != expect:
                    raise RuntimeError(f"{base_url}: HTTP {reply.status} (expected {expect}): {reply.body[:300]!r}")
                if index < lead_in:
                    continue
                latencies.append(answered - due)
                timing = SERVER_TIMING.search(reply.headers.get("server-timing", ""))
                if timing:
                    timings.append(float(timing[1]))
        finally:
            await connection.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return Run(latencies, time.perf_counter() - counted_from, timings, host=HostTicks.now() - ticks_before)


async def alternating(rounds: int, contenders: Mapping[str, Callable[[], Awaitable[T]]]) -> dict[str, list[T]]:
    """Run each contender once per round, in turn (A, B, A, B...), so the shared machine's noise falls on
    all of them alike; returns each one's results in order."""
    results: dict[str, list[T]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, measure in contenders.items():
            results[name].append(await measure())
    return results


def pooled_p99_ms(runs: Sequence[Run]) -> float:
    """The p99 of every run's requests together. One run's p99 is one of its few slowest requests (of 200, the
    third slowest), a noisy estimate; the rounds together give it several times the requests to rest on, each
    round still run alternating with the baseline's."""
    return percentile([latency for run in runs for latency in run.latencies_s], 0.99) * 1000


def steal_percent(runs: Sequence[Run]) -> float:
    """The share of the machine's CPU time the hypervisor took over all the runs together, in percent."""
    steal, total = sum(run.host.steal for run in runs), sum(run.host.total for run in runs)
    return 100 * steal / total if total else 0.0


def slow_per_thousand(runs: Sequence[Run]) -> float | None:
    """The commands redis-server was slow to run per 1,000 requests, median over the runs, if it was watched."""
    counts = [run.slow_redis_commands for run in runs]
    return None if any(count is None for count in counts) else median([count or 0.0 for count in counts])


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
