"""Two commits of the gateway side by side: the latency each adds to a create and its CPU per request, in one run
against one simulator, alternating, so a change to the hot path is judged on this shared machine's noise alike.

    python -m bench.compare BASE [OTHER] [--redis] [--mcp] [--after-burst] [--rounds N]

With `--mcp`, the same for MCP tool calls: `generate_image` (wait 0) through the SDK's client, in both eras, as
`python -m bench.mcp_calls` calls it: calls per second, latency and the gateway's CPU per call.

With `--after-burst`, the paced load is run once more, each time BURST_GAP_S after a burst of BURST_CLIENTS clients:
steady traffic a few seconds after a spike, when a gateway still holds what the spike made it open (its outbound
connections, say).

OTHER defaults to the working tree as it is (uncommitted changes included). Each commit runs from a temporary git
worktree under this checkout's virtualenv, so both must run on the same dependencies. Prints a table; writes
nothing to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from app.kling import KlingCredentials
from bench.http import Connection, Reply
from bench.mcp_calls import CLIENTS, FULL_SPAN, Measured, Target, calls_per_era
from bench.measure import Run, alternating, closed_loop, median, paced, pooled_p99_ms, steal_percent
from bench.overhead import DIRECT, PACED_LEAD_IN_S, cpu_ms, direct_sender, pace_below, rest_sender
from bench.serving import ROOT, Server, enter_together, raise_fd_limit
from bench.stack import (
    ACCOUNT_SLOTS,
    FULL,
    SimulatorProcess,
    accounts_for,
    api_keys,
    gateway,
    settled,
    with_server_cpu,
)
from tests.servers import redis_server

WORKING_TREE = "working tree"
ACCOUNTS_PER_GATEWAY = 4
Send = Callable[[Connection, int], Awaitable[Reply]]


@dataclass(frozen=True)
class Load:
    name: str
    clients: int
    requests: int
    per_second: float | None = None
    lead_in: int = 0  # paced requests sent first and not counted (bench.overhead PACED_LEAD_IN_S)
    after_burst: bool = False  # BURST_GAP_S after a burst of BURST_CLIENTS clients, not counted


LOADS = (Load("1 client", 1, 300), Load("16 clients", 16, 640))
PACED_REQUESTS = 300  # then 16 clients paced as bench.overhead paces them, from the closed loop's rates
BURST_CLIENTS, BURST_REQUESTS = 64, 640
# Longer than the gateway's outbound pool keeps an unused connection (app/http_pool.py KEEPALIVE_EXPIRY_S, 5 s), and
# than its first status read of the burst's tasks (about 1.2 s after each create): the burst's own work is over.
BURST_GAP_S = 6.0


@contextlib.contextmanager
def checked_out(rev: str) -> Iterator[Path]:
    """`rev` in a temporary worktree, or this checkout itself for the working tree."""
    if rev == WORKING_TREE:
        yield ROOT
        return
    with tempfile.TemporaryDirectory(prefix="kgw-compare-") as parent:
        path = Path(parent) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)


async def measured(url: str, send: Send, load: Load, expect: int, server: Server | None) -> Run:
    """One run of `load`, with the gateway's CPU per request up to the end of its following of the run's tasks
    (none for the simulator, which is not ours to read)."""

    async def run() -> Run:
        if load.per_second is None:
            return await closed_loop(url, send, clients=load.clients, requests=load.requests, expect=expect)
        return await paced(url, send, clients=load.clients, per_second=load.per_second, requests=load.requests,
                           expect=expect, lead_in=load.lead_in)  # fmt: skip

    if load.after_burst:
        await closed_loop(url, send, clients=BURST_CLIENTS, requests=BURST_REQUESTS, expect=expect)
        await asyncio.sleep(BURST_GAP_S)  # the time that passes is the point: nothing to await but the clock
    if server is None:
        return await run()
    return await with_server_cpu(server, load.lead_in + load.requests, run, following=FULL)


async def compare(revs: list[str], redis: bool, rounds: int, mcp: bool = False, after_burst: bool = False) -> str:
    raise_fd_limit()
    accounts = accounts_for((1 + ACCOUNTS_PER_GATEWAY * len(revs)) * ACCOUNT_SLOTS)
    with contextlib.ExitStack() as trees:
        roots = {rev: trees.enter_context(checked_out(rev)) for rev in revs}
        # A Redis each: they would otherwise hear each other's broadcasts and adopt each other's tasks.
        redis_urls = {rev: trees.enter_context(redis_server()) if redis else None for rev in revs}
        async with contextlib.AsyncExitStack() as stack:
            kling = SimulatorProcess(FULL.task_s, accounts)
            sim, *gateways = await enter_together(
                stack, kling, *(gateway(kling.url, redis_url=redis_urls[rev], root=root) for rev, root in roots.items())
            )
            if mcp:
                tools = {}
                for index, (rev, server) in enumerate(zip(roots, gateways, strict=True)):
                    own = accounts[1 + index * ACCOUNTS_PER_GATEWAY : 1 + (index + 1) * ACCOUNTS_PER_GATEWAY]
                    tools[rev] = Target(server, "generate_image", await api_keys(server.url, own), sim, FULL)
                return render_mcp(await calls_per_era(tools, rounds, FULL_SPAN), redis, rounds)
            direct = direct_sender(KlingCredentials(accounts[0].access_key, accounts[0].secret_key))
            targets: dict[str, tuple[str, Send, int, Server | None]] = {DIRECT: (sim.url, direct, 200, None)}
            for index, (rev, server) in enumerate(zip(roots, gateways, strict=True)):
                own = accounts[1 + index * ACCOUNTS_PER_GATEWAY : 1 + (index + 1) * ACCOUNTS_PER_GATEWAY]
                targets[rev] = (server.url, rest_sender(await api_keys(server.url, own)), 202, server)
            for url, send, expect, followed in targets.values():  # warm up: connections, caches, JWTs, Lua scripts
                await closed_loop(url, send, clients=16, requests=300, expect=expect)
                if followed is not None:  # a gateway: its warm-up's tasks are followed to their end first
                    await settled(followed.url, FULL)
            results = {}
            for load in LOADS:
                contenders = {name: _contender(*target, load) for name, target in targets.items()}
                results[load.name] = await alternating(rounds, contenders)
            pace = pace_below(results["16 clients"], roots)
            at_pace = Load(f"16 paced at {pace:.0f}/s", 16, PACED_REQUESTS, pace, round(PACED_LEAD_IN_S * pace))
            paced_loads = [at_pace]
            if after_burst:
                name = f"{at_pace.name}, {BURST_GAP_S:g} s after {BURST_CLIENTS} clients"
                paced_loads.append(replace(at_pace, name=name, after_burst=True))
            for load in paced_loads:
                contenders = {name: _contender(*target, load) for name, target in targets.items()}
                results[load.name] = await alternating(rounds, contenders)
    return render(results, revs, redis, rounds)


def render_mcp(results: dict[str, dict[str, list[Measured]]], redis: bool, rounds: int) -> str:
    rows = []
    for era, by_rev in results.items():
        for rev, runs in by_rev.items():
            rate, p50 = median([m.run.per_second for m in runs]), median([m.run.p50_ms for m in runs])
            server, simulator = (median([m.cpu_ms[part] for m in runs]) for part in ("server", "simulator"))
            rows.append(f"| {era} | {rev} | {rate:,.0f} | {p50:.1f} | {pooled_p99_ms([m.run for m in runs]):.1f} | "
                        f"{server:.2f} | {simulator:.2f} |")  # fmt: skip
    store = "Redis" if redis else "the memory store"
    return f"""Gateway with {store}: {CLIENTS} MCP SDK clients calling `generate_image` (wait 0) in a row, {rounds} rounds alternating per era, medians (p99: over the rounds' calls together). CPU is per call, lead-in and the following of each task included: the gateway process's, and the simulator's (Kling's side).

| era | commit | calls/s | p50 ms | p99 ms | gateway CPU ms per call | simulator CPU ms per call |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def _contender(url: str, send: Send, expect: int, server: Server | None, load: Load) -> Callable[[], Awaitable[Run]]:
    return lambda: measured(url, send, load, expect, server)


def render(results: dict[str, dict[str, list[Run]]], revs: list[str], redis: bool, rounds: int) -> str:
    rows = []
    for load, by_target in results.items():
        direct_p50 = statistics.median(run.p50_ms for run in by_target[DIRECT])
        direct_p99 = pooled_p99_ms(by_target[DIRECT])
        for rev in revs:
            runs = by_target[rev]
            p50 = statistics.median(run.p50_ms for run in runs) - direct_p50
            p99 = pooled_p99_ms(runs) - direct_p99
            timing = statistics.median(statistics.median(run.server_timings_ms or [0.0]) for run in runs)
            cpu = cpu_ms(runs)
            rows.append(f"| {load} | {rev} | +{p50:.2f} | +{p99:.2f} | {timing:.2f} | {cpu:.2f} | "
                        f"{steal_percent(runs):.1f} |")  # fmt: skip
    store = "Redis" if redis else "the memory store"
    return f"""Gateway with {store}, {rounds} rounds, medians (p99: over the rounds' requests together); "added" is over the simulator called directly.
CPU is the gateway process's CPU per request, its following of the task included. Steal is the share of the
machine's CPU time the hypervisor took during the commit's runs: where it differs, so does the noise.

| load | commit | added p50 ms | added p99 ms | `Server-Timing` ms | CPU ms per request | steal % |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="a commit (anything git rev-parse takes)")
    parser.add_argument("other", nargs="?", default=WORKING_TREE, help="another commit (default: the working tree)")
    parser.add_argument("--redis", action="store_true", help="gateways on a Redis of their own, not in memory")
    parser.add_argument("--mcp", action="store_true", help="MCP tool calls instead of REST requests")
    parser.add_argument("--after-burst", action="store_true",
                        help=f"also the paced load {BURST_GAP_S:g} s after a burst of {BURST_CLIENTS} clients")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if args.mcp and args.after_burst:
        parser.error("--after-burst runs a REST load: it does not go with --mcp")
    print(asyncio.run(compare([args.base, args.other], args.redis, args.rounds, args.mcp, args.after_burst)))


if __name__ == "__main__":
    main()
