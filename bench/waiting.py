"""Waiting capacity: how many generations one gateway worker holds while Kling works on them, and at what cost.

Each waiter is a REST `POST /generate` with a long `wait_seconds`, on its own connection. The waiters ramp up
to 1,000, 5,000 and 10,000 and are held at each; then the simulator finishes every task (`POST /_sim/finish`)
and calls the gateway back (KGW_PUBLIC_URL is set, as in production); the gateway's own polling remains the
fallback. Measured: RSS of the
gateway process per waiter, the event loop's lag inside it (bench/probes.py LagProbe), a tiny request's latency
from outside while everyone waits, upstream queries per task, and how soon after Kling finished each caller got
its images.

    python -m bench.waiting [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import datetime

from app.kling import LIST_PAGE_MAX
from app.status_queries import BATCH_WINDOW_S, ENTRIES_PER_READ, FALLBACK_BATCH_WINDOW_S, LIST_PAGES_MAX
from bench.http import Connection, Reply
from bench.measure import percentile
from bench.overhead import PROMPT
from bench.probes import LAG_PATH
from bench.report import Finding, write_section, write_summary
from bench.serving import Server, enter_together, raise_fd_limit
from bench.stack import SimulatorProcess, accounts_for, api_keys, gateway

HOLD_S = 3.0  # how long the waiters are held at each milestone while the gateway is measured (half, quick)
RAMP_BACKLOG = 256  # requests sent but not yet created at Kling: keeps the listen backlog from overflowing
PROBE_INTERVAL_S = 0.05
# Kling's simulated duration: longer than any run, so no task ends until the benchmark lets them all finish
# (`POST /_sim/finish`), in the order and at the pace they were created (the time spent ramping up), as Kling
# would finish tasks of about equal length.
SIM_DELAY_S = 3600.0
WAIT_S = 300  # the gateway's largest `wait_seconds`: nobody gives up before their task ends


@dataclass(frozen=True)
class Milestone:
    """The gateway holding `held` waiters at once."""

    held: int
    ramp_s: float  # from the first request to all `held` created at Kling
    rss_added_mib: float
    lag_ramp_p99_ms: float  # while the waiters since the last milestone were coming in
    lag_held_p99_ms: float
    lag_held_max_ms: float
    collection_max_ms: float  # the longest garbage collection while held
    collection_share: float  # of the hold's time, spent collecting garbage
    probe_p50_ms: float
    probe_p99_ms: float

    @property
    def kib_per_waiter(self) -> float:
        return self.rss_added_mib * 1024 / max(1, self.held)


@dataclass(frozen=True)
class Ending:
    """All waiters' tasks finishing, and every caller answered."""

    finish_s: float  # the window the simulator ended the tasks in
    lag_p99_ms: float
    succeeded: int
    failures: dict[int, int]
    queries: int
    lists: int
    creates: int
    callbacks: int
    callbacks_failed: int
    delivered_p50_s: float
    delivered_p99_s: float
    first_failure: str  # the body of the first refusal, if any


async def waiter(url: str, key: str) -> tuple[Reply, float]:
    """One caller on its own connection; returns the answer and when it arrived (epoch seconds)."""
    connection = Connection(url)
    try:
        reply = await connection.request("POST", "/generate", {"prompt": PROMPT, "wait_seconds": WAIT_S},
                                         {"Authorization": f"Bearer {key}"})  # fmt: skip
        return reply, time.time()
    finally:
        await connection.close()


@dataclass(frozen=True)
class Recording:
    """What the gateway's LagProbe recorded: the loop's lags and the garbage collections' pauses (seconds)."""

    lags: list[float]
    collections: list[float]


async def recording(control: Connection, *, restart: bool) -> Recording:
    """What was recorded since the last restart; `restart` starts a new recording."""
    recorded = (await control.request("POST" if restart else "GET", LAG_PATH)).json()
    return Recording(recorded["lags_s"], recorded["collections_s"])


async def sim_counts(stats: Connection) -> dict[str, int]:
    counts: dict[str, int] = (await stats.request("GET", "/_sim/stats")).json()
    return counts


async def ramp(
    gw: Server, stats: Connection, keys: list[str], started: list[asyncio.Task[tuple[Reply, float]]], target: int
) -> None:
    """Start waiters until `target` tasks are created at Kling, keeping at most RAMP_BACKLOG of them not yet
    created. A waiter answered early was refused (it shows in the end's failures) and is replaced; the ramp
    gives up when more than 1 % are."""
    base = (await sim_counts(stats))["creates"] - sum(not task.done() for task in started)
    while (created := (await sim_counts(stats))["creates"] - base) < target:
        refused = sum(task.done() for task in started)
        if refused > target // 100:
            break
        pending = len(started) - refused - created  # sent, not yet created at Kling
        for _ in range(min(RAMP_BACKLOG - pending, target - created - pending)):
            started.append(asyncio.create_task(waiter(gw.url, keys[len(started) % len(keys)])))
        await asyncio.sleep(0.1)  # the simulator's count is all there is to wait on


async def hold(gw: Server, hold_s: float) -> tuple[list[float], float]:
    """Tiny requests (`GET /healthz`) at a steady pace for `hold_s`: their latencies, and the largest RSS seen."""
    probe = Connection(gw.url)
    latencies: list[float] = []
    rss = 0
    deadline = time.monotonic() + hold_s
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


async def run(milestones: tuple[int, ...], hold_s: float) -> tuple[list[Milestone], Ending]:
    """One simulator and gateway; the waiters ramp up to each milestone in turn and are held there."""
    accounts = accounts_for(milestones[-1] * 11 // 10)  # slack: refused waiters are replaced, unevenly over keys
    kling = SimulatorProcess(SIM_DELAY_S, accounts)
    async with contextlib.AsyncExitStack() as stack:
        sim, gw = await enter_together(
            stack, kling, gateway(kling.url, factory="bench.probes:lag_probed_gateway", callbacks=True)
        )
        keys = await api_keys(gw.url, accounts)
        control, stats = Connection(gw.url), Connection(sim.url)
        before = await sim_counts(stats)
        rss_base = gw.rss_bytes() / 2**20
        tasks: list[asyncio.Task[tuple[Reply, float]]] = []
        reached: list[Milestone] = []
        await recording(control, restart=True)
        ramp_started, ramping_s = time.monotonic(), 0.0
        for target in milestones:
            segment_started = time.monotonic()
            await ramp(gw, stats, keys, tasks, target)
            ramping_s += time.monotonic() - segment_started
            ramp_s = time.monotonic() - ramp_started
            lag_ramp = await recording(control, restart=True)
            held = (await sim_counts(stats))["creates"] - before["creates"] - sum(t.done() for t in tasks)
            probes, rss_held = await hold(gw, hold_s)
            lag_held = await recording(control, restart=True)
            reached.append(Milestone(
                held, ramp_s, rss_held - rss_base, _p99_ms(lag_ramp.lags), _p99_ms(lag_held.lags),
                max(lag_held.lags, default=0) * 1000, max(lag_held.collections, default=0) * 1000,
                sum(lag_held.collections) / hold_s, percentile(probes, 0.5) * 1000, percentile(probes, 0.99) * 1000,
            ))  # fmt: skip
        finish_s = ramping_s
        await stats.request("POST", "/_sim/finish", {"within_s": finish_s})
        answers = await asyncio.gather(*tasks, return_exceptions=True)
        lag_end = await recording(control, restart=False)
        await asyncio.sleep(1.0)  # callbacks of the last tasks may still be on their way; nothing signals them
        after = await sim_counts(stats)
        await control.close()
        await stats.close()
    return reached, ending(answers, finish_s, lag_end.lags, before, after)


def ending(
    answers: list[tuple[Reply, float] | BaseException],
    finish_s: float,
    lag_end: list[float],
    before: dict[str, int],
    after: dict[str, int],
) -> Ending:
    succeeded, failures, delivered, first_failure = 0, dict[int, int](), [], ""
    for answer in answers:
        if isinstance(answer, BaseException):
            failures[0] = failures.get(0, 0) + 1  # no answer: the connection failed
            first_failure = first_failure or repr(answer)
            continue
        reply, arrived = answer
        if reply.status == 200 and reply.json()["status"] == "succeeded":
            succeeded += 1
            delivered.append(arrived - datetime.fromisoformat(reply.json()["updated_at"]).timestamp())
        else:
            failures[reply.status] = failures.get(reply.status, 0) + 1
            first_failure = first_failure or reply.body[:300].decode(errors="replace")
    return Ending(
        finish_s, _p99_ms(lag_end), succeeded, failures,
        after["queries"] - before["queries"], after["lists"] - before["lists"], after["creates"] - before["creates"],
        after["callbacks_sent"] - before["callbacks_sent"], after["callbacks_failed"] - before["callbacks_failed"],
        percentile(delivered, 0.5) if delivered else float("nan"), percentile(delivered, 0.99) if delivered else float("nan"),
        first_failure,
    )  # fmt: skip


def _p99_ms(values: list[float]) -> float:
    return percentile(values, 0.99) * 1000 if values else float("nan")


async def main(quick: bool) -> str:
    raise_fd_limit()
    hold_s = HOLD_S / 2 if quick else HOLD_S
    reached, end = await run((1000,) if quick else (1000, 5000, 10000), hold_s)
    rows = [
        f"| {m.held:,} | {m.ramp_s:.1f} | {m.rss_added_mib:.0f} | **{m.kib_per_waiter:.1f}** | {m.lag_ramp_p99_ms:.1f} | "
        f"**{m.lag_held_p99_ms:.1f}** ({m.lag_held_max_ms:.0f}) | {m.collection_max_ms:.0f} ({m.collection_share:.0%}) | "
        f"{m.probe_p50_ms:.1f} / {m.probe_p99_ms:.1f} |"
        for m in reached
    ]
    command = "python -m bench.waiting" + (" --quick" if quick else "")
    body = f"""## Waiting capacity (`{command}`)

Run {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}. One gateway worker (memory store, `KGW_PUBLIC_URL` set
so the simulator calls it back, as in production) takes REST callers, each `POST /generate` with `wait_seconds:
{WAIT_S}` on its own connection, while at most {RAMP_BACKLOG} are not yet created at Kling. The simulated Kling
holds every task until the benchmark lets them finish, so the callers pile up: at each milestone the ramp pauses
and all of them are held at once for {hold_s:g} s while the gateway is measured. Every tenant's limits are at the
admin API's ceiling and each Kling account has 1,000 slots (one tenant per 1,000 waiters).

| held at once | ramp s | RSS added MiB | KiB per waiter | loop lag p99 ms, ramp | loop lag p99 ms, held (max) | longest garbage collection ms, held (share of the time) | `GET /healthz` p50 / p99 ms, held |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Then the simulator finished all {end.creates:,} tasks within {end.finish_s:.0f} s (the time spent ramping up), in the
order they were created:

| loop lag p99 ms, finishing | succeeded | upstream reads per task (list calls, in all) | callbacks per task | result after Kling finished, p50 / p99 s |
|---|---|---|---|---|
| {end.lag_p99_ms:.1f} | {end.succeeded:,}{_failed(end.failures)} | **{end.queries / max(1, end.creates):.2f}** ({end.lists:,}) | {end.callbacks / max(1, end.creates):.2f}{f" ({end.callbacks_failed:,} failed)" if end.callbacks_failed else ""} | {end.delivered_p50_s:.2f} / {end.delivered_p99_s:.2f} |

{f"- The first refusal said: `{end.first_failure}`{chr(10)}" if end.first_failure else ""}- **RSS added** is the gateway process's resident memory while the waiters are held, minus before the first
  request: sockets, request state, the waiting coroutines and each task's follower.
- **Loop lag** is how late a {1000 * 0.005:g} ms sleep inside the gateway wakes (bench/probes.py `LagProbe`): the
  time any ready request or Kling answer waits for the worker. "finishing" covers the tasks ending and every
  caller being answered.
- **Garbage collection**: CPython's cyclic collector stops the worker while it runs (bench/probes.py records each
  collection). Each waiter keeps a few hundred objects alive (its connection, request, coroutines and its
  task's follower), and a collection of even the youngest objects takes longer the more there are: with
  thousands held, its longest pauses are about the loop lag's p99 (the longest lags also hold the worker's waits
  for a core, which it shares here with the client and the simulator). More waiters per worker cost lag, not
  only memory: past a few thousand, more workers (or replicas) rather than more waiters each.
- **Upstream reads per task**: the simulator's status reads (`/_sim/stats` `queries`: single queries and list
  calls) divided by its creates. With callbacks, polling is the fallback for a lost one: 5 s after the create,
  backing off to every 30 s, so a task held for the whole run falls due a few times; reads of one account that
  fall due within {FALLBACK_BATCH_WINDOW_S:g} s of each other ({BATCH_WINDOW_S:g} s without callbacks) are answered by list calls,
  newest first, as far back as pages of at most {ENTRIES_PER_READ} entries per read reach (up to {LIST_PAGES_MAX} pages of
  {LIST_PAGE_MAX}); the older ones, by queries of their own (app/status_queries.py).
- **Result after Kling finished**: when the caller got its answer minus the task's `updated_at` (the simulator's
  end time), on the same clock.
- **The ramp's pace sets the load after it.** A gateway that takes waiters on faster holds younger tasks, which
  its fallback polls read more often, and sees them finish faster (at the pace they were created). Compare the
  held and finishing figures of two runs only at similar ramp times: a change that makes the ramp faster can show
  higher loop lag held and finishing while doing less work per waiter.
"""
    write_section("waiting", body)
    write_summary("waiting", findings(reached[-1], end), quick=quick)
    return body


def findings(most: Milestone, end: Ending) -> list[Finding]:
    """The summary's rows: what the most waiters held at once cost, and what their ending did."""
    return [
        Finding(f"Memory per waiting caller, {most.held:,} held on one worker", f"{most.kib_per_waiter:.1f} KiB"),
        Finding(f"Event-loop lag p99 while {most.held:,} wait (longest garbage collection)",
                f"{most.lag_held_p99_ms:.1f} ms ({most.collection_max_ms:.0f} ms)"),
        Finding(f"Kling status reads per task as {end.creates:,} waited tasks finish (Kling's callbacks on)",
                f"{end.queries / max(1, end.creates):.2f}; {end.succeeded:,} of {end.creates:,} callers answered"),
    ]  # fmt: skip


def _failed(failures: dict[int, int]) -> str:
    if not failures:
        return ""
    named = (f"{n} × {f'HTTP {status}' if status else 'no answer'}" for status, n in failures.items())
    return f" ({', '.join(named)})"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the 1,000 milestone only")
    print(asyncio.run(main(parser.parse_args().quick)))
