"""Where a gateway's paced p99 comes from: the same code twice, side by side in one run, against the simulator
called directly. One gateway reads each task's status at the default time after its create, as in service, so
the ends of earlier tasks (the status reads, the records, the releases) share its worker with the requests being
measured; the other reads it 60 s after, once the run is over, so its requests are measured without that work.

    python -m bench.tail [--redis] [--pace N] [--rounds N]

Prints a table; writes nothing to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from app.kling import KlingCredentials
from bench.measure import Run, alternating, median, percentile, pooled_p99_ms, slow_per_thousand, steal_percent
from bench.overhead import (
    DIRECT,
    PACED_CLIENTS,
    PACED_LEAD_IN_S,
    Target,
    direct_sender,
    paced_contender,
    rest_sender,
)
from bench.serving import enter_together, raise_fd_limit
from bench.stack import (
    ACCOUNT_SLOTS,
    DEFAULT_FIRST_QUERY_S,
    FULL,
    SLOW_COMMAND_US,
    SimulatorProcess,
    SlowCommands,
    accounts_for,
    api_keys,
    gateway,
)
from tests.servers import redis_server

ACCOUNTS_PER_GATEWAY = 4
LATE_FIRST_QUERY_S = 60.0  # after any run here: none of its tasks ends while it is measured
REQUESTS = 400  # counted per run, after a lead-in of PACED_LEAD_IN_S at the pace


async def measure(redis: bool, pace: float, rounds: int) -> str:
    raise_fd_limit()
    accounts = accounts_for((1 + 2 * ACCOUNTS_PER_GATEWAY) * ACCOUNT_SLOTS)
    with contextlib.ExitStack() as redises:
        urls = [redises.enter_context(redis_server()) if redis else None for _ in range(2)]
        async with contextlib.AsyncExitStack() as stack:
            kling = SimulatorProcess(FULL.task_s, accounts)
            sim, following, deferred = await enter_together(
                stack,
                kling,
                gateway(kling.url, redis_url=urls[0]),
                gateway(kling.url, redis_url=urls[1], first_query_s=LATE_FIRST_QUERY_S),
            )
            direct = direct_sender(KlingCredentials(accounts[0].access_key, accounts[0].secret_key))
            own = [accounts[1 + i * ACCOUNTS_PER_GATEWAY : 1 + (i + 1) * ACCOUNTS_PER_GATEWAY] for i in range(2)]
            gateways = {
                f"gateway, status read {DEFAULT_FIRST_QUERY_S:g} s after the create": (following, own[0], urls[0]),
                f"gateway, status read {LATE_FIRST_QUERY_S:g} s after": (deferred, own[1], urls[1]),
            }
            targets = {DIRECT: Target(sim.url, direct, 200, sim)}
            for name, (server, keys_of, _) in gateways.items():
                targets[name] = Target(server.url, rest_sender(await api_keys(server.url, keys_of)), 202, server)
            lead_in = round(PACED_LEAD_IN_S * pace)
            for target in targets.values():  # warm up: connections, caches, JWTs, Lua scripts
                await paced_contender(target, pace, lead_in, 0)()
            contenders = {name: paced_contender(target, pace, REQUESTS, lead_in) for name, target in targets.items()}
            for name, (_, _, url) in gateways.items():
                if url is not None:  # each gateway's own Redis, watched for slow commands during its runs
                    slow = SlowCommands(url)
                    stack.push_async_callback(slow.aclose)
                    contenders[name] = slow.watching(lead_in + REQUESTS, contenders[name])
            results = await alternating(rounds, contenders)
    return render(results, redis, pace, rounds)


def slowest_timing_ms(runs: list[Run]) -> float:
    """The median `Server-Timing` of the slowest 1% of requests: high when the tail is time spent in the gateway
    (its Redis waits, its event loop), low when it is outside (the Kling call, the network, the client)."""
    answered = [(latency, timing) for run in runs for latency, timing in zip(run.latencies_s, run.server_timings_ms,
                                                                             strict=True)]  # fmt: skip
    slowest = sorted(answered, reverse=True)[: max(1, len(answered) // 100)]
    return percentile([timing for _, timing in slowest], 0.5)


def render(results: dict[str, list[Run]], redis: bool, pace: float, rounds: int) -> str:
    direct_p50, direct_p99 = median([run.p50_ms for run in results[DIRECT]]), pooled_p99_ms(results[DIRECT])
    rows = []
    for name, runs in results.items():
        if name == DIRECT:
            continue
        p50 = median([run.p50_ms for run in runs]) - direct_p50
        timing = median([median(run.server_timings_ms) for run in runs])
        slow = slow_per_thousand(runs)
        per_thousand = "–" if slow is None else f"{slow:.1f}"
        rows.append(f"| {name} | +{p50:.2f} | +{pooled_p99_ms(runs) - direct_p99:.2f} | {timing:.2f} | "
                    f"{slowest_timing_ms(runs):.2f} | {per_thousand} | {steal_percent(runs):.1f} |")  # fmt: skip
    store = "Redis" if redis else "the memory store"
    return f"""Gateways with {store}, {PACED_CLIENTS} clients paced at {pace:g} requests/s, {rounds} rounds alternating, \
{REQUESTS} requests counted per run after a lead-in; "added" is over the simulator called directly (p50: median \
of the rounds; p99: over the rounds' requests together). `Server-Timing`: the median, and the median over the \
slowest 1% of requests. Slow Redis commands: those redis-server took over {SLOW_COMMAND_US} µs to run (its \
SLOWLOG), per 1,000 requests sent (median of the rounds). Steal: the share of the machine's CPU time the \
hypervisor took during the runs (direct: {steal_percent(results[DIRECT]):.1f}%).

| gateway | added p50 ms | added p99 ms | `Server-Timing` ms | slowest 1%: `Server-Timing` ms | slow Redis commands | steal % |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", action="store_true", help="gateways on a Redis of their own, not in memory")
    parser.add_argument("--pace", type=float, default=100.0, help="requests per second, all clients together")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    print(asyncio.run(measure(args.redis, args.pace, args.rounds)))


if __name__ == "__main__":
    main()
