"""MCP tool calls per second over streamable HTTP: the gateway's `generate_image` (wait 0) against a no-op tool
on the same SDK and transport settings (the SDK's own ceiling), in both protocol eras, with the SDK's client.

    python -m bench.mcp_calls [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import TextContent

from bench.measure import Run, alternating, median
from bench.overhead import PROMPT, SIM_DELAY_S
from bench.report import write_section
from bench.serving import raise_fd_limit, served
from bench.stack import accounts_for, api_keys, gateway, simulator

ERAS = {"2026-07-28": "auto", "2025-11-25": "legacy"}  # SDK Client modes that negotiate each era
CLIENTS = 8
GOAL_COST = 0.20


@dataclass(frozen=True)
class Target:
    url: str
    tool: str
    keys: list[str]


async def calls(target: Target, mode: str, clients: int, per_client: int) -> Run:
    """`clients` SDK clients, each with its own connection pool, calling the tool `per_client` times in a row."""
    latencies: list[float] = []

    async def client(index: int) -> None:
        headers = {"Authorization": f"Bearer {target.keys[index % len(target.keys)]}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=120)) as http,
            Client(streamable_http_client(f"{target.url}/mcp", http_client=http), mode=mode) as session,
        ):
            for _ in range(per_client):
                started = time.perf_counter()
                result = await session.call_tool(target.tool, {"prompt": PROMPT, "wait_seconds": 0})
                latencies.append(time.perf_counter() - started)
                if result.is_error:
                    text = " ".join(b.text for b in result.content if isinstance(b, TextContent))
                    raise RuntimeError(f"{target.tool} failed: {text[:300]}")

    started = time.perf_counter()
    await asyncio.gather(*(client(index) for index in range(clients)))
    return Run(latencies, time.perf_counter() - started)


async def main(quick: bool) -> str:
    raise_fd_limit()
    rounds, per_client = (2, 15) if quick else (5, 80)
    accounts = accounts_for(4000)
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(simulator(SIM_DELAY_S, accounts))
        gw = await stack.enter_async_context(gateway(sim.url))
        noop = await stack.enter_async_context(served("bench.apps:noop_mcp_app", {}))
        targets = {"gateway `generate_image`": Target(gw.url, "generate_image", await api_keys(gw.url, accounts)),
                   "no-op tool (SDK ceiling)": Target(noop.url, "noop", ["-"])}  # fmt: skip
        results: dict[str, dict[str, list[Run]]] = {}
        for era, mode in ERAS.items():

            def contender(target: Target, mode: str = mode) -> Callable[[], Awaitable[Run]]:
                return lambda: calls(target, mode, CLIENTS, per_client)

            for target in targets.values():  # warm up
                await calls(target, mode, CLIENTS, 5)
            results[era] = await alternating(rounds, {name: contender(t) for name, t in targets.items()})
    body = render(results, rounds, per_client, quick)
    write_section("mcp", body)
    return body


def render(results: dict[str, dict[str, list[Run]]], rounds: int, per_client: int, quick: bool) -> str:
    rows, verdicts = [], []
    for era, by_target in results.items():
        rates = {name: median([run.per_second for run in runs]) for name, runs in by_target.items()}
        gateway_rate, ceiling_rate = rates["gateway `generate_image`"], rates["no-op tool (SDK ceiling)"]
        cost = 1 - gateway_rate / ceiling_rate
        for name, runs in by_target.items():
            p50, p99 = median([r.p50_ms for r in runs]), median([r.p99_ms for r in runs])
            share = f"{rates[name] / ceiling_rate:.0%}"
            rows.append(f"| {era} | {name} | {rates[name]:,.0f} | {p50:.1f} | {p99:.1f} | {share} |")
        verdicts.append(f"{era}: the gateway's work costs **{cost:.0%}** of the SDK's ceiling "
                        f"({'within' if cost <= GOAL_COST else 'over'} the {GOAL_COST:.0%} goal).")  # fmt: skip
    command = "python -m bench.mcp_calls" + (" --quick" if quick else "")
    return f"""## MCP tool calls per second (`{command}`)

Run {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}. {CLIENTS} MCP SDK clients (`mcp.Client`, each with its own
httpx2 pool) call a tool {per_client} times each in a row with `wait_seconds: 0`: the gateway's `generate_image`
(which creates a Kling task on the simulator), and a no-op tool on an `MCPServer` with the gateway's transport
settings (`stateless_http=True`, `json_response=False`) under the same uvicorn settings: the SDK's own ceiling on
this machine. `auto` negotiates 2026-07-28 (sessionless), `legacy` 2025-11-25 (an `initialize` per client). The
two targets run in turn, {rounds} rounds; figures are medians over the rounds.

| era | target | calls/s | p50 ms | p99 ms | of the ceiling |
|---|---|---|---|---|---|
{chr(10).join(rows)}

{chr(10).join(f"- {v}" for v in verdicts)}

"Cost" is 1 − gateway calls/s ÷ ceiling calls/s. The client (the SDK's, in one process) shares the two cores with
the server, and for the gateway also with the simulator, so both rates are lower than a server alone would reach.
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    print(asyncio.run(main(parser.parse_args().quick)))
