"""MCP tool calls per second over streamable HTTP: the gateway's `generate_image` (wait 0) against a no-op tool
on the same SDK and transport settings (the SDK's own ceiling) and the floor (a tool that only sends the same
create through the gateway's Kling client), in both protocol eras, with the SDK's client.

    python -m bench.mcp_calls [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import TextContent

from bench.measure import Run, alternating, median, pooled_p99_ms
from bench.overhead import PACED_LEAD_IN_S, PROMPT
from bench.report import Finding, write_section, write_summary
from bench.serving import Server, enter_together, raise_fd_limit, served
from bench.stack import (
    FULL,
    QUICK,
    TLS,
    Following,
    SimulatorProcess,
    accounts_for,
    api_keys,
    floor_server,
    gateway,
    settled,
)

ERAS = {"2026-07-28": "auto", "2025-11-25": "legacy"}  # SDK Client modes that negotiate each era
CLIENTS = 8
GOAL_COST = 0.20
LEAD_IN_S = PACED_LEAD_IN_S  # as bench.overhead's paced runs: until the first tasks' status queries are under way
LEAD_IN_NOTE = (
    " (the first ones bring the gateway to its steady state, following its earlier tasks as it would in service:"
    " it reads each task's status about a second after creating it)"
)
GATEWAY, CEILING = "gateway `generate_image`", "no-op tool (SDK ceiling)"
FLOOR = "floor: SDK + the gateway's Kling create"


@dataclass(frozen=True)
class Target:
    server: Server
    tool: str
    keys: list[str]
    simulator: Server | None = None  # what the tool calls, on the same cores
    following: Following | None = None  # the gateway's: it goes on polling the tasks it created


@dataclass(frozen=True)
class Measured:
    run: Run
    cpu_ms: dict[str, float]  # CPU per call of the "client", the "server" and the "simulator"


@dataclass(frozen=True)
class Span:
    """How long each client calls: for `lead_in_s` first, uncounted, then for `window_s`, counted. The lead-in
    brings a gateway to its steady state: its first status reads come about a second after its first creates."""

    lead_in_s: float
    window_s: float


FULL_SPAN = Span(LEAD_IN_S, 1.5)


@dataclass(frozen=True)
class Calls:
    run: Run  # the calls started after the lead-in
    made: int  # all the calls, lead-in included
    client_cpu_s: float  # the clients' CPU over the span (their sessions opened before it)


async def measured_calls(target: Target, sessions: list[Client], span: Span) -> Measured:
    """`calls`, and the CPU each process used per call, lead-in included."""
    processes = {"server": target.server} | ({"simulator": target.simulator} if target.simulator else {})
    before = {name: process.cpu_seconds() for name, process in processes.items()}
    made = await calls(target, sessions, span)
    if target.following is not None:  # the gateway: its following of the run's tasks is part of their cost
        await settled(target.server.url, target.following)
    cpu_ms = {"client": made.client_cpu_s * 1000 / made.made, "simulator": 0.0}
    cpu_ms |= {name: (process.cpu_seconds() - before[name]) * 1000 / made.made for name, process in processes.items()}
    return Measured(made.run, cpu_ms)


@contextlib.asynccontextmanager
async def opened_sessions(target: Target, mode: str, clients: int) -> AsyncIterator[list[Client]]:
    """`clients` SDK clients of `target`, each with its own connection pool and session, open for the block: the
    rounds of an era reuse them, as a client connected by URL would. Opening them (about half a second for eight
    here) is no call's cost, and would otherwise be much of a quick run."""
    async with contextlib.AsyncExitStack() as stack:
        sessions = []
        for index in range(clients):  # in this task: the SDK closes a session in the task that opened it
            headers = {"Authorization": f"Bearer {target.keys[index % len(target.keys)]}"}
            http = await stack.enter_async_context(
                httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=120), verify=TLS)
            )
            session = Client(streamable_http_client(f"{target.server.url}/mcp", http_client=http), mode=mode)
            sessions.append(await stack.enter_async_context(session))
        yield sessions


async def calls(target: Target, sessions: list[Client], span: Span) -> Calls:
    """Each of the open `sessions` calling the tool in a row for the span; the run of the calls started after the
    lead-in, and how many calls were made in all."""
    latencies: list[float] = []
    made = 0
    start, cpu_at_start = time.perf_counter(), time.process_time()
    counted_from, ends = start + span.lead_in_s, start + span.lead_in_s + span.window_s
    cpu_at_end = last_answer = 0.0

    async def client(session: Client) -> None:
        nonlocal made, cpu_at_end, last_answer
        answered = 0.0
        while answered < ends:
            called = time.perf_counter()
            result = await session.call_tool(target.tool, {"prompt": PROMPT, "wait_seconds": 0})
            answered = time.perf_counter()
            made += 1
            if result.is_error:
                text = " ".join(b.text for b in result.content if isinstance(b, TextContent))
                raise RuntimeError(f"{target.tool} failed: {text[:300]}")
            if called >= counted_from:
                latencies.append(answered - called)
                last_answer = max(last_answer, answered)
        cpu_at_end = time.process_time()  # the last client's last call

    async with asyncio.TaskGroup() as group:  # one client failing stops the others before their sessions close
        for session in sessions:
            group.create_task(client(session))
    if not latencies:
        raise RuntimeError(f"no call of {target.tool} started in the counted {span.window_s:g} s; lengthen the span")
    return Calls(Run(latencies, last_answer - counted_from), made, cpu_at_end - cpu_at_start)


async def main(quick: bool) -> str:
    raise_fd_limit()
    # Quick runs skip the lead-in: their figures leave out part of the gateway's following of its tasks.
    rounds, span = (2, Span(0.0, 0.4)) if quick else (4, FULL_SPAN)  # the gateway's
    following = QUICK if quick else FULL
    accounts = accounts_for(4000)
    async with contextlib.AsyncExitStack() as stack:
        kling = SimulatorProcess(following.task_s, accounts)
        sim, gw, noop, floor = await enter_together(
            stack,
            kling,
            gateway(kling.url, first_query_s=following.first_query_s),
            served("bench.mcp_apps:noop_mcp_app", {}),
            floor_server("bench.mcp_apps:floor_mcp_app", kling.url, accounts[-1]),
        )
        keys = await api_keys(gw.url, accounts[:-1])
        targets = {GATEWAY: Target(gw, "generate_image", keys, sim, following),
                   FLOOR: Target(floor, "generate_image", ["-"], sim),
                   CEILING: Target(noop, "noop", ["-"])}  # fmt: skip
        results = await calls_per_era(targets, rounds, span)
    body = render(results, rounds, span, quick)
    write_section("mcp", body)
    write_summary("mcp", findings(results), quick=quick)
    return body


def costs(by_target: dict[str, list[Measured]]) -> tuple[float, float]:
    """What the gateway's calls and the floor's cost of the SDK's ceiling: 1 - their rate / the ceiling's."""
    rates = {name: median([m.run.per_second for m in runs]) for name, runs in by_target.items()}
    return 1 - rates[GATEWAY] / rates[CEILING], 1 - rates[FLOOR] / rates[CEILING]


def cost_by_round(by_target: dict[str, list[Measured]], name: str) -> str:
    """The range of `name`'s cost of the ceiling over the rounds, each round against the ceiling's run beside it: how
    far one round's figure moves with the host."""
    per_round = [1 - own.run.per_second / ceiling.run.per_second
                 for own, ceiling in zip(by_target[name], by_target[CEILING], strict=True)]  # fmt: skip
    return f"{min(per_round):.0%} to {max(per_round):.0%}"


def findings(results: dict[str, dict[str, list[Measured]]]) -> list[Finding]:
    rows = []
    for era, by_target in results.items():
        cost, floor_cost = costs(by_target)
        rows.append(Finding(f"MCP `generate_image` calls/s, {era}: what the gateway costs of the SDK's no-op ceiling",
                            f"{cost:.0%}, rounds {cost_by_round(by_target, GATEWAY)} (the Kling create alone, the floor: "
                            f"{floor_cost:.0%}, rounds {cost_by_round(by_target, FLOOR)})",
                            f"≤ {GOAL_COST:.0%}", cost <= GOAL_COST))  # fmt: skip
    return rows


async def calls_per_era(targets: dict[str, Target], rounds: int, span: Span) -> dict[str, dict[str, list[Measured]]]:
    """In each era, `targets` called in turn, `rounds` times, alternating (`measured_calls`), each through its own
    SDK sessions opened once for the era. Only a target that follows its tasks (a gateway) has a steady state to
    reach: the others are measured without the lead-in."""
    results = {}
    for era, mode in ERAS.items():
        async with contextlib.AsyncExitStack() as era_stack:
            sessions = {name: await era_stack.enter_async_context(opened_sessions(target, mode, CLIENTS))
                        for name, target in targets.items()}  # fmt: skip
            for name, target in targets.items():  # warm up, and follow the warm-up's tasks to their end
                await calls(target, sessions[name], Span(0.0, 0.2))
                if target.following is not None:
                    await settled(target.server.url, target.following)
            contenders = {name: partial(measured_calls, target, sessions[name],
                                        span if target.following else Span(0.0, span.window_s))
                          for name, target in targets.items()}  # fmt: skip
            results[era] = await alternating(rounds, contenders)
    return results


def render(results: dict[str, dict[str, list[Measured]]], rounds: int, span: Span, quick: bool) -> str:
    rows, verdicts = [], []
    for era, by_target in results.items():
        rates = {name: median([m.run.per_second for m in runs]) for name, runs in by_target.items()}
        cpu = {name: {part: median([m.cpu_ms[part] for m in runs]) for part in ("client", "server", "simulator")}
               for name, runs in by_target.items()}  # fmt: skip
        gateway, ceiling = GATEWAY, CEILING  # short names for the lines below
        cost, floor_cost = costs(by_target)
        own_cost = 1 - rates[gateway] / rates[FLOOR]
        own_cpu = cpu[gateway]["server"] - cpu[FLOOR]["server"]
        client_cores = cpu[ceiling]["client"] * rates[ceiling] / 1000
        server_extra = cpu[gateway]["server"] - cpu[ceiling]["server"]
        for name, runs in by_target.items():
            p50, p99 = median([m.run.p50_ms for m in runs]), pooled_p99_ms([m.run for m in runs])
            share = f"{rates[name] / rates[ceiling]:.0%}"
            parts = " / ".join(f"{cpu[name][part]:.2f}" for part in ("client", "server", "simulator"))
            rows.append(f"| {era} | {name} | {rates[name]:,.0f} | {p50:.1f} | {p99:.1f} | {share} | {parts} |")
        verdicts.append(f"{era}: the gateway's work costs **{cost:.0%}** of the SDK's ceiling "
                        f"({'within' if cost <= GOAL_COST else 'over'} the {GOAL_COST:.0%} goal; one round at a time, "
                        f"{cost_by_round(by_target, gateway)}). Per call the gateway's "
                        f"server spends {cpu[gateway]['server']:.2f} ms of CPU, {server_extra:.2f} ms more than the "
                        f"no-op's; the SDK client used {client_cores:.0%} of a core in the ceiling's runs. The Kling "
                        f"create alone (the floor) costs {floor_cost:.0%} of the ceiling ({cost_by_round(by_target, FLOOR)}); over the floor, the gateway's "
                        f"own work costs {own_cost:.0%} of the floor's rate and {own_cpu:.2f} ms of server CPU per call.")  # fmt: skip
    if span.lead_in_s:
        lead_in_note = f", the gateway's after {span.lead_in_s:g} s of calls not counted{LEAD_IN_NOTE}"
    else:
        lead_in_note = (f" (a quick run: no lead-in, and the gateway reads a task's status {QUICK.read_after_s:g} s "
                        "after creating it rather than about a second, so it follows fewer tasks at once)")  # fmt: skip
    command = "python -m bench.mcp_calls" + (" --quick" if quick else "")
    return f"""## MCP tool calls per second (`{command}`)

Run {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}. {CLIENTS} MCP SDK clients (`mcp.Client`, each with its own
httpx2 pool and session, opened once per era before its first run) call a tool in a row with `wait_seconds: 0`, and the calls started in {span.window_s:g} s are counted{lead_in_note}: the gateway's `generate_image`
(which creates a Kling task on the simulator), a no-op tool on an `MCPServer` with the gateway's transport
settings (`stateless_http=True`, `json_response=False`) under the same uvicorn settings: the SDK's own ceiling on
this machine, and the floor: the same server with a tool that sends the gateway's create through the gateway's
own Kling client and returns the task id, nothing else. `auto` negotiates 2026-07-28 (sessionless), `legacy`
2025-11-25 (an `initialize` per client). The three targets run in turn, {rounds} rounds; figures are medians over
the rounds but p99, which is over all the rounds' calls together.

| era | target | calls/s | p50 ms | p99 ms | of the ceiling | CPU ms per call: client / server / simulator |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{chr(10).join(f"- {v}" for v in verdicts)}

"Cost" is 1 − gateway calls/s ÷ ceiling calls/s. The client (the SDK's, in one process) shares the two cores with
the server, and for the gateway also with the simulator, so both rates are lower than a server alone would reach.
The server and simulator columns are each process's CPU time (from /proc) over the run, until the gateway has
stopped following its tasks; the client's is its own over the span; each is divided by the calls, lead-in included; the simulator's is Kling's side (the creates, and the status queries of the gateway
following each task), work this machine does only because Kling runs on it. All the clients share one process, which one core bounds: when it nears a whole core, the
ceiling is the client's as much as the SDK server's, and the server CPU per call is the closer measure of what the
gateway's work adds.
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    print(asyncio.run(main(parser.parse_args().quick)))
