"""Waiting capacity: how many generations one gateway worker holds while Kling works on them, and at what cost.

Each waiter is a REST `POST /generate` with a `wait_seconds` longer than the simulated Kling takes, on its own
connection. The simulator finishes every task `delay` seconds after its create and calls the gateway back
(KGW_PUBLIC_URL is set, as in production); the gateway's own polling remains the fallback. Measured: RSS of the
gateway process per waiter, the event loop's lag inside it (bench/apps.py LagProbe), a tiny request's latency
from outside while everyone waits, upstream queries per task, and how soon after Kling finished each caller got
its images.

    python -m bench.waiting [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from datetime import datetime

from bench.apps import LAG_PATH
from bench.http import Connection, Reply
from bench.measure import percentile
from bench.overhead import PROMPT
from bench.report import write_section
from bench.serving import Server, raise_fd_limit
from bench.stack import Simulator, accounts_for, api_keys, gateway, simulator

HOLD_S = 3.0  # how long all waiters are held while the gateway is measured
RAMP_BACKLOG = 256  # requests sent but not yet created at Kling: keeps the listen backlog from overflowing
PROBE_INTERVAL_S = 0.05


def delay_for(waiters: int) -> float:
    """Kling's simulated duration: long enough to submit every waiter (a few hundred per second on a busy
    two-core machine) and hold them all for HOLD_S before the first finishes."""
    return 5.0 + waiters / 150 + HOLD_S


@dataclass(frozen=True)
class Level:
    waiters: int
    started: int  # fewer than `waiters` when the first task finished before all were created
    delay_s: float
    ramp_s: float
    held: int  # waiting at once while measured
    rss_base_mib: float
    rss_held_mib: float
    lag_ramp_p99_ms: float
    lag_held_p99_ms: float
    lag_held_max_ms: float
    lag_end_p99_ms: float
    probe_p50_ms: float
    probe_p99_ms: float
    succeeded: int
    failures: dict[int, int]
    queries: int
    creates: int
    callbacks: int
    callbacks_failed: int
    delivered_p50_s: float
    delivered_p99_s: float

    @property
    def kib_per_waiter(self) -> float:
        return (self.rss_held_mib - self.rss_base_mib) * 1024 / max(1, self.held)


async def waiter(url: str, key: str, wait_s: int) -> tuple[Reply, float]:
    """One caller on its own connection; returns the answer and when it arrived (epoch seconds)."""
    connection = Connection(url)
    try:
        reply = await connection.request("POST", "/generate", {"prompt": PROMPT, "wait_seconds": wait_s},
                                         {"Authorization": f"Bearer {key}"})  # fmt: skip
        return reply, time.time()
    finally:
        await connection.close()


async def lags(control: Connection, *, restart: bool) -> list[float]:
    """The lags recorded since the last restart (seconds); `restart` starts a new recording."""
    reply = await control.request("POST" if restart else "GET", LAG_PATH)
    recorded: list[float] = reply.json()["lags_s"]
    return recorded


async def sim_counts(stats: Connection) -> dict[str, int]:
    counts: dict[str, int] = (await stats.request("GET", "/_sim/stats")).json()
    return counts


async def ramp(
    gw: Server, sim: Simulator, keys: list[str], waiters: int, wait_s: int
) -> list[asyncio.Task[tuple[Reply, float]]]:
    """Start the waiters, keeping at most RAMP_BACKLOG of them not yet created at Kling, until all are created
    (or one has already finished: the ramp was slower than the simulated Kling)."""
    stats = Connection(sim.url)
    base = (await sim_counts(stats))["creates"]
    started: list[asyncio.Task[tuple[Reply, float]]] = []
    try:
        while True:
            created = (await sim_counts(stats))["creates"] - base
            if created >= waiters or any(task.done() for task in started):
                return started
            for _ in range(min(RAMP_BACKLOG - (len(started) - created), waiters - len(started))):
                started.append(asyncio.create_task(waiter(gw.url, keys[len(started) % len(keys)], wait_s)))
            await asyncio.sleep(0.1)  # the simulator's count is all there is to wait on
    finally:
        await stats.close()


async def hold(gw: Server) -> tuple[list[float], float]:
    """Tiny requests (`GET /healthz`) at a steady pace for HOLD_S: their latencies, and the largest RSS seen."""
    probe = Connection(gw.url)
    latencies: list[float] = []
    rss = 0
    deadline = time.monotonic() + HOLD_S
    try:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await probe.request("GET", "/healthz")
            latencies.append(time.perf_counter() - started)
            rss = max(rss, gw.rss_bytes())
            await asyncio.sleep(PROBE_INTERVAL_S)
    finally:
        await probe.close()
    return latencies, rss / 2**20


async def one_level(waiters: int) -> Level:
    delay = delay_for(waiters)
    accounts = accounts_for(waiters)
    async with simulator(delay, accounts) as sim, gateway(sim.url, factory="bench.apps:lag_probed_gateway",
                                                          callbacks=True) as gw:  # fmt: skip
        keys = await api_keys(gw.url, accounts)
        control = Connection(gw.url)
        before = await sim_counts(control_sim := Connection(sim.url))
        rss_base = gw.rss_bytes() / 2**20
        await lags(control, restart=True)
        ramp_started = time.monotonic()
        tasks = await ramp(gw, sim, keys, waiters, wait_s=int(delay) + 60)
        ramp_s = time.monotonic() - ramp_started
        lag_ramp = await lags(control, restart=True)
        held = (await sim_counts(control_sim))["creates"] - before["creates"] - sum(t.done() for t in tasks)
        probes, rss_held = await hold(gw)
        lag_held = await lags(control, restart=True)
        answers = await asyncio.gather(*tasks, return_exceptions=True)
        lag_end = await lags(control, restart=False)
        await asyncio.sleep(1.0)  # callbacks of the last tasks may still be on their way; nothing signals them
        after = await sim_counts(control_sim)
        await control.close()
        await control_sim.close()
    succeeded, failures, delivered = 0, dict[int, int](), []
    for answer in answers:
        if isinstance(answer, BaseException):
            failures[0] = failures.get(0, 0) + 1  # no answer: the connection failed
            continue
        reply, arrived = answer
        if reply.status == 200 and reply.json()["status"] == "succeeded":
            succeeded += 1
            delivered.append(arrived - datetime.fromisoformat(reply.json()["updated_at"]).timestamp())
        else:
            failures[reply.status] = failures.get(reply.status, 0) + 1
    return Level(
        waiters, len(tasks), delay, ramp_s, held, rss_base, rss_held,
        _p99_ms(lag_ramp), _p99_ms(lag_held), max(lag_held, default=0) * 1000, _p99_ms(lag_end),
        percentile(probes, 0.5) * 1000, percentile(probes, 0.99) * 1000, succeeded, failures,
        after["queries"] - before["queries"], after["creates"] - before["creates"],
        after["callbacks_sent"] - before["callbacks_sent"], after["callbacks_failed"] - before["callbacks_failed"],
        percentile(delivered, 0.5) if delivered else float("nan"), percentile(delivered, 0.99) if delivered else float("nan"),
    )  # fmt: skip


def _p99_ms(values: list[float]) -> float:
    return percentile(values, 0.99) * 1000 if values else float("nan")


async def main(quick: bool) -> str:
    raise_fd_limit()
    levels = [await one_level(waiters) for waiters in ((1000,) if quick else (1000, 5000, 10000))]
    rows = [
        f"| {lv.waiters:,} | {lv.started:,} | {lv.held:,} | {lv.ramp_s:.1f} | {lv.rss_held_mib - lv.rss_base_mib:.0f} | "
        f"**{lv.kib_per_waiter:.1f}** | {lv.lag_ramp_p99_ms:.1f} | **{lv.lag_held_p99_ms:.1f}** ({lv.lag_held_max_ms:.0f}) | "
        f"{lv.lag_end_p99_ms:.1f} | {lv.probe_p50_ms:.1f} / {lv.probe_p99_ms:.1f} | "
        f"**{lv.queries / max(1, lv.creates):.2f}** | {lv.callbacks / max(1, lv.creates):.2f}"
        f"{f' ({lv.callbacks_failed:,} failed)' if lv.callbacks_failed else ''} | "
        f"{lv.succeeded:,}{_failed(lv.failures)} | {lv.delivered_p50_s:.2f} / {lv.delivered_p99_s:.2f} |"
        for lv in levels
    ]
    command = "python -m bench.waiting" + (" --quick" if quick else "")
    body = f"""## Waiting capacity (`{command}`)

Run {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}. One gateway worker (memory store, `KGW_PUBLIC_URL` set
so the simulator calls it back) holds N REST callers, each `POST /generate` with a `wait_seconds` longer than the
simulated Kling takes, each on its own connection. Waiters are started while at most {RAMP_BACKLOG} are not yet
created at Kling; the simulator finishes each task {", ".join(f"{lv.delay_s:.0f} s" for lv in levels)} (by level)
after its create, long enough that all are waiting at once for {HOLD_S:g} s ("held"). Each level runs on a fresh
simulator and gateway. Every tenant's limits are at the admin API's ceiling and each Kling account has 1,000
slots (one tenant per 1,000 waiters).

| waiters | started | held at once | ramp s | RSS added MiB | KiB per waiter | loop lag p99 ms, ramp | loop lag p99 ms, held (max) | loop lag p99 ms, finishing | `GET /healthz` p50 / p99 ms, held | upstream queries per task | callbacks per task | succeeded | result after Kling finished, p50 / p99 s |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

- **started** is below the target when the first task finished before all were created: the worker could not
  take callers faster than the simulated Kling finished them (its time went to the tasks already waiting); **held
  at once** is how many were waiting together while measured, and memory per waiter is per held waiter.
- **RSS added** is the gateway process's resident memory while all are held, minus before the first request:
  sockets, request state, the waiting coroutines and each task's follower.
- **Loop lag** is how late a {1000 * 0.005:g} ms sleep inside the gateway wakes (bench/apps.py `LagProbe`): the
  time any ready request or Kling answer waits for the worker. "finishing" covers the tasks ending and every
  caller being answered.
- **Upstream queries per task**: the simulator's status queries (`/_sim/stats` `queries`) divided by its creates;
  callbacks make most of them unnecessary.
- **Result after Kling finished**: when the caller got its answer minus the task's `updated_at` (the simulator's
  end time), on the same clock.
"""
    write_section("waiting", body)
    return body


def _failed(failures: dict[int, int]) -> str:
    if not failures:
        return ""
    named = (f"{n} × {f'HTTP {status}' if status else 'no answer'}" for status, n in failures.items())
    return f" ({', '.join(named)})"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1,000 waiters only")
    print(asyncio.run(main(parser.parse_args().quick)))
