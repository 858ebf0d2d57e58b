"""Limiter benchmark: decisions per second against real Redis (memory alongside), Redis round trips per
decision and per request (auth cache miss and hit, a generation's whole life), and admission accuracy with 200
concurrent clients on 2 gateway processes.

    python -m bench.limiter [--quick]

Traffic goes only to servers this script starts on 127.0.0.1, and everything stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx2
from redis.asyncio import Redis
from redis.asyncio.client import Monitor

from app.main import create_redis
from app.ratelimit import Limiter, MemoryLimiter, RedisLimiter, TenantLimits
from app.sealing import new_master_key
from app.simulator import SimAccount, SimulatorConfig, create_simulator_app
from bench.measure import alternating
from bench.report import Finding, machine, write_section, write_summary
from bench.serving import enter_together
from bench.stack import ACCOUNT_SLOTS, ADMIN_TOKEN, QUICK, TLS, api_keys
from tests.servers import gateway_process, redis_server, serve

UNLIMITED = TenantLimits(requests_per_minute=10**9, concurrent_tasks=10**9, images_per_day=10**9)


async def decisions_per_second(limiter: Limiter, decisions: int, concurrency: int) -> float:
    """`decisions` admit_request calls from `concurrency` workers; returns decisions per second."""
    remaining = decisions

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await limiter.admit_request(f"t{remaining % 100}", "k", UNLIMITED)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return decisions / (time.perf_counter() - started)


async def round_trips_per_decision(redis: Redis, limiter: Limiter, decisions: int) -> tuple[float, float]:
    """(requests the client sends, commands Redis runs including those inside the script) per decision."""

    async def calls() -> tuple[int, int]:
        stats = await redis.info("commandstats")
        sent = sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval", "script"))
        total = sum(int(value["calls"]) for name, value in stats.items() if name != "cmdstat_info")
        return sent, total

    sent_before, total_before = await calls()
    for index in range(decisions):
        await limiter.admit_request(f"rt{index % 10}", "k", UNLIMITED)
    sent_after, total_after = await calls()
    return (sent_after - sent_before) / decisions, (total_after - total_before) / decisions


# Commands from one connection this close together (after the last command the previous one's script ran, if
# any) were sent together (a pipeline): no round trip through a Python client on loopback takes less (redis-py
# spends 100-200 us of CPU on each), while Redis may run a pipeline's commands more than 20 us apart on a busy
# host (seen: a pipeline counted twice).
PIPELINED_WITHIN_S = 80e-6


@dataclass
class RoundTrips:
    """Counts what Redis runs for the gateway (MONITOR), as client round trips: commands a script runs are
    not sent by anyone, and a pipeline's commands travel together."""

    monitor: Monitor
    counted: int = 0
    _last: tuple[str, float] = ("", 0.0)

    async def until(self, done: Callable[[str], bool]) -> int:
        """Count commands until one for which `done(command)` holds (counted too); returns the count so far."""
        while True:
            async with asyncio.timeout(30):
                command = await self.monitor.next_command()
            if command["client_type"] != "lua":  # what a script runs was sent with the script
                sender = f"{command['client_address']}:{command['client_port']}"
                if sender != self._last[0] or command["time"] - self._last[1] > PIPELINED_WITHIN_S:
                    self.counted += 1
                self._last = (sender, command["time"])
            else:  # the gap to a pipeline's next script starts when this one's last command ran, not its first
                self._last = (self._last[0], command["time"])
            if done(command["command"]):
                return self.counted

    async def none_within(self, seconds: float, about: Callable[[str], bool]) -> None:
        """Raise if Redis runs a command for which `about(command)` holds within `seconds`: the count just taken
        ended too early (a round trip of the task's end came after the one taken for its last)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    command = (await self.monitor.next_command())["command"]
                    if about(command):
                        raise RuntimeError(f"a round trip after the one counted as the last: {command[:200]}")


# How long nothing more about a task must reach Redis after its count ended: its end's round trips come within a
# few milliseconds of each other.
QUIET_AFTER_END_S = 0.5


def mentioning(text: str) -> Callable[[str], bool]:
    return lambda command: text in command


def lease_released(command: str) -> bool:
    """The follower's last act for a task without a webhook: its tenant's concurrency lease given back, after the
    account's slot (the release script's last command drops the lease's weight). Its follow mark went earlier,
    with the record of its end; its poll lease lapses."""
    return command.startswith("HDEL") and ":rl:" in command and command.split()[1].strip('"').endswith(":weights")


def gateway_env(redis_url: str, kling_url: str) -> dict[str, str]:
    """A Redis-backed gateway's settings, with a new pepper and master key: made once per Redis, as every
    gateway on one Redis has to share them. It polls as a quick run's gateways do: a task's one status read comes
    sooner, and its round trips are the same. Its usage counts are written only as it stops, so no write of theirs
    (one per tenant, key and day each `KGW_USAGE_FLUSH_SECONDS`, however many requests) falls among those counted."""
    return {"KGW_REDIS_URL": redis_url, "KGW_KEY_PEPPER": secrets.token_urlsafe(24),
            "KGW_MASTER_KEY": new_master_key(), "KGW_ADMIN_TOKEN": ADMIN_TOKEN, "KGW_KLING_BASE_URL": kling_url,
            "KGW_POLL_INTERVAL_SECONDS": str(QUICK.first_query_s), "KGW_USAGE_FLUSH_SECONDS": "3600"}  # fmt: skip


async def round_trips_per_request(replica_url: str, redis_url: str, account: SimAccount) -> dict[str, int]:
    """Round trips the gateway process at `replica_url`, alone on `redis_url`, makes for: a request whose key is
    not in its cache, the same request again (cached), and a `POST /generate` (wait 0) over its whole life, from
    the request to the task's end (its first status query finds it ended, as bench.stack's gateways do)."""
    counts: dict[str, int] = {}
    async with httpx2.AsyncClient(timeout=30, verify=TLS) as http:
        warm_up, headers = ({"Authorization": f"Bearer {key}"} for key in await api_keys(replica_url, (account,) * 2))
        watcher = Redis.from_url(redis_url)
        async with watcher.monitor() as monitor:
            trips = RoundTrips(monitor)
            # Scripts loaded and connections opened first: those happen once per process, not per request.
            await http.get(f"{replica_url}/tasks/bench-none-warm", headers=warm_up)
            (await http.post(f"{replica_url}/generate", json={"prompt": "x"}, headers=warm_up)).raise_for_status()
            await trips.until(lease_released)
            for label in ("auth miss", "auth hit"):  # the task lookup answers 404; its GET ends the request
                before, task_key = trips.counted, f"task:bench-none-{label[5:]}"
                await http.get(f"{replica_url}/tasks/bench-none-{label[5:]}", headers=headers)
                counts[label] = await trips.until(mentioning(task_key)) - before
            before = trips.counted
            created = await http.post(f"{replica_url}/generate", json={"prompt": "x", "wait_seconds": 0},
                                      headers=headers)  # fmt: skip
            created.raise_for_status()
            counts["generate"] = await trips.until(lease_released) - before
            await trips.none_within(QUIET_AFTER_END_S, mentioning(created.json()["task_id"]))
        await watcher.aclose()
    return counts


async def admission_accuracy(
    replica_urls: list[str], account: SimAccount, clients: int, per_minute: int, rounds: int
) -> list[int]:
    """Admitted counts, one per round, of `clients` simultaneous submissions over the two gateway processes at
    `replica_urls` (one Redis) against `per_minute`."""
    limits = httpx2.Limits(max_connections=clients * 2)
    async with httpx2.AsyncClient(timeout=60, limits=limits, verify=TLS) as http:
        return [await _one_round(http, replica_urls, account, clients, per_minute) for _ in range(rounds)]


@contextlib.asynccontextmanager
async def limited_gateways(
    counted_redis: str, shared_redis: str, counted: SimAccount, shared: SimAccount
) -> AsyncIterator[tuple[str, list[str]]]:
    """A gateway alone on `counted_redis` (its round trips are counted), and two sharing `shared_redis` (their
    admissions are), each pair with a simulator of its own: started at once, as each takes seconds to start."""
    async with contextlib.AsyncExitStack() as stack:
        counted_kling, shared_kling = [
            await stack.enter_async_context(serve(create_simulator_app(SimulatorConfig((account,), delay=delay))))
            for account, delay in ((counted, QUICK.task_s), (shared, 0.5))
        ]
        shared_env = gateway_env(shared_redis, shared_kling)
        alone, first, second = await enter_together(
            stack,
            gateway_process(gateway_env(counted_redis, counted_kling)),
            gateway_process(shared_env),
            gateway_process(shared_env),
        )
        yield alone.url, [first.url, second.url]


async def _one_round(http: httpx2.AsyncClient, urls: list[str], account: SimAccount,
                     clients: int, per_minute: int) -> int:  # fmt: skip
    limits = {"requests_per_minute": per_minute, "concurrent_tasks": clients, "images_per_day": 10**6}
    headers = {"Authorization": f"Bearer {(await api_keys(urls[0], (account,), limits))[0]}"}

    async def submit(index: int) -> int:
        response = await http.post(f"{urls[index % 2]}/generate", json={"prompt": "bench"}, headers=headers)
        return response.status_code

    codes = await asyncio.gather(*(submit(index) for index in range(clients)))
    unexpected = {code for code in codes if code not in (202, 429)}
    if unexpected:
        raise RuntimeError(f"unexpected statuses {unexpected}")
    return codes.count(202)


async def main(quick: bool) -> None:
    decisions, repeats, rounds = (2_000, 3, 2) if quick else (5_000, 5, 5)
    with redis_server() as url:
        redis = create_redis(url, retries=0)
        redis_limiter, memory_limiter = RedisLimiter(redis, lease_ttl_s=60), MemoryLimiter(lease_ttl_s=60)
        await decisions_per_second(redis_limiter, 500, 32)  # warm up: connections, script load
        # Alternating, so that the shared machine's noise falls on both alike.
        rates = await alternating(repeats, {
            "redis": lambda: decisions_per_second(redis_limiter, decisions, 64),
            "memory": lambda: decisions_per_second(memory_limiter, decisions, 64),
        })  # fmt: skip
        redis_samples, memory_samples = rates["redis"], rates["memory"]
        redis_rate, memory_rate = statistics.median(redis_samples), statistics.median(memory_samples)
        trips, commands = await round_trips_per_decision(redis, redis_limiter, 1000)
        await redis.aclose()
        counted, shared = (SimAccount(f"bench-{name}-ak", "bench-sk-" + secrets.token_hex(24), ACCOUNT_SLOTS)
                           for name in ("rt", "admit"))  # fmt: skip
        with redis_server() as shared_url:
            async with limited_gateways(url, shared_url, counted, shared) as (alone, pair):
                per_request = await round_trips_per_request(alone, url, counted)
                admitted = await admission_accuracy(pair, shared, clients=200, per_minute=50, rounds=rounds)
    body = f"""## Limiter (`python -m bench.limiter{" --quick" if quick else ""}`)

Machine: {machine()}. Run {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}.

| measure | result |
|---|---|
| rate decisions per second, Redis (`admit_request`, 64 concurrent callers, one process) | **{redis_rate:,.0f}** median of {repeats} (samples {", ".join(f"{s:,.0f}" for s in redis_samples)}) |
| same decisions per second, memory backend (the ceiling without the network) | {memory_rate:,.0f} median (samples {", ".join(f"{s:,.0f}" for s in memory_samples)}) |
| Redis round trips per rate decision | {trips:.2f} (one EVALSHA; the script is loaded once), running {commands:.1f} commands inside Redis |
| Redis round trips per request, key not in the replica's cache (`GET /tasks/{{id}}`) | {per_request["auth miss"]} (key, tenant and Kling account records and the key's last use; the rate decision; the task record) |
| same request, key cached (for up to 1 s, dropped at once on revocation) | {per_request["auth hit"]} |
| Redis round trips of a `POST /generate` (wait 0) over the task's whole life, key cached | {per_request["generate"]} (the limits and the account's slot, two scripts in one pipeline; the record with the follow mark and the poll lease; then the new state recorded and broadcast and its follow mark dropped in one script (a task without a webhook; its poll lease lapses), and the two leases' releases in one pipeline. Tasks that end together, as a list call answers them, share these last two: app/script_batches.py) |
| admission accuracy: 200 simultaneous submissions over 2 gateway processes against 50/min | admitted {", ".join(map(str, admitted))} in {rounds} rounds (exact = 50) |

Usage is not among these: a replica counts it in memory and writes it every `KGW_USAGE_FLUSH_SECONDS` (1 s by
default), one round trip per tenant, key and day counted in that second, however many requests they made.

Each decision is one Lua script; the rate is clocked by Redis `TIME`, so the replicas' clocks play no part.
The Redis figure is bound by the Python client in one process (each round trip costs the event loop far
more than Redis spends on the script); more processes scale it until Redis itself saturates.
"""
    write_section("limiter", body)
    write_summary("limiter", [
        Finding("Rate decisions per second against Redis, one process", f"{redis_rate:,.0f}"),
        Finding("Redis round trips of a generation over its whole life (key cached)", f"{per_request['generate']}"),
        Finding("Admission accuracy: 200 simultaneous submissions over 2 replicas against 50/min",
                f"admitted {', '.join(map(str, admitted))} in {rounds} rounds", "exactly 50",
                all(count == 50 for count in admitted)),
    ], quick=quick)  # fmt: skip
    print(body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer decisions and rounds (well under a minute)")
    asyncio.run(main(parser.parse_args().quick))
