"""Gateway-added latency and the REST ceiling: `POST /generate` (wait 0) through the gateway, with the memory
store and with Redis, against the same create sent straight to the simulator, a bare FastAPI endpoint, and the
floor (a FastAPI route sending the create through the gateway's own Kling client, and doing nothing else), at 1,
16 and 64 concurrent clients.

    python -m bench.overhead [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import httpcore2
import httpx2

from app.http_pool import TIMEOUTS, create_kling_pool
from app.kling import GENERATIONS_PATH, JwtCache, KlingCredentials, build_generation_body, encode_call
from app.models import GenerateRequest
from app.simulator import SimAccount
from bench.apps import FloorKling
from bench.http import Connection, Reply
from bench.measure import (
    Run,
    alternating,
    closed_loop,
    median,
    paced,
    percentile,
    pooled_p99_ms,
    slow_per_thousand,
    steal_percent,
)
from bench.report import Finding, write_section, write_summary
from bench.serving import Server, enter_together, raise_fd_limit, served
from bench.stack import (
    ACCOUNT_SLOTS,
    DEFAULT_FIRST_QUERY_S,
    FULL,
    QUICK,
    SLOW_COMMAND_US,
    Following,
    SimulatorProcess,
    SlowCommands,
    accounts_for,
    api_keys,
    floor_server,
    gateway,
    kling_calls,
    with_server_cpu,
)
from tests.servers import redis_server

# 16 clients again, but below saturation: a closed loop at 16 clients measures queueing behind a busy worker
# (latency = clients / throughput), a paced load what each request costs when the worker keeps up. The pace is
# PACED_SHARE of the slowest target's closed-loop rate at 16 clients in the same run, and at most
# PACED_PER_SECOND: a fixed pace would saturate the Redis-backed gateway on a slow day of this shared host.
PACED_CLIENTS, PACED_PER_SECOND, PACED_SHARE = 16, 150.0, 0.5
# And at most this share of the tasks per second the costliest gateway's CPU per task, busy, allows. A task paced
# costs a worker about half as much again as one in a busy closed loop (each request, status query and Redis answer
# wakes it): a third keeps that gateway's worker about half busy, as PACED_SHARE means to.
PACED_CPU_SHARE = 1 / 3
# Requests sent on a paced schedule before those counted (in a full run): each task's status read comes about 1.2 s
# after its create, so until then a gateway would be measured without that part of its work.
PACED_LEAD_IN_S = 1.5
# How long a paced run's counted requests last at most: the pace is lower on a slow host, and the run would be longer.
PACED_WINDOW_S = 3.0
PROMPT = "a lighthouse at dawn, oil on canvas"
GOAL_P50_MS, GOAL_P99_MS = 1.0, 5.0
DIRECT, FLOOR = "direct to the simulator", "floor: FastAPI + the gateway's Kling client"
CEILING = "bare FastAPI endpoint"
REDIS_FLOOR = "floor with Redis: the floor + a round trip before the create and one after"
# The goal holds for both stores: a deployment of several replicas runs on Redis.
MEMORY_GATEWAY, REDIS_GATEWAY = "gateway, memory store", "gateway, Redis"
VERDICT_GATEWAYS = {MEMORY_GATEWAY: "memory store", REDIS_GATEWAY: "Redis"}
ON_REDIS = (REDIS_GATEWAY, REDIS_FLOOR)  # the targets whose Redis is watched for slow commands
# What each gateway's own work is measured over: the floor of a gateway keeping its state where it does.
FLOOR_OF = {MEMORY_GATEWAY: FLOOR, REDIS_GATEWAY: REDIS_FLOOR}
FLOORS = (FLOOR, REDIS_FLOOR)
FLOOR_SAYS = {FLOOR: "FastAPI and the Kling call alone",
              REDIS_FLOOR: "FastAPI, the Kling call and a Redis round trip before and after it"}  # fmt: skip
OUTBOUND_CLIENT, OUTBOUND_POOL = "the gateway's Kling client", "httpcore2's pool alone"
OUTBOUND_MINIMAL = "the benchmark's minimal client"
# Four Kling accounts per gateway: each task keeps its slots until the gateway's follower sees it end.
ACCOUNTS_PER_GATEWAY = 4


Send = Callable[[Connection, int], Awaitable[Reply]]


def direct_sender(credentials: KlingCredentials) -> Send:
    """The create the gateway would send for a wait-0 /generate: same body, a fresh external_task_id."""
    jwts = JwtCache()

    async def send(connection: Connection, _: int) -> Reply:
        body = build_generation_body(GenerateRequest(prompt=PROMPT), external_task_id=f"kgw-{uuid.uuid4().hex}")
        headers = {"Authorization": f"Bearer {jwts.token(credentials)}"}
        return await connection.request("POST", GENERATIONS_PATH, body, headers)

    return send


def rest_sender(keys: list[str]) -> Send:
    headers = [{"Authorization": f"Bearer {key}"} for key in keys]

    async def send(connection: Connection, index: int) -> Reply:
        return await connection.request("POST", "/generate", {"prompt": PROMPT, "wait_seconds": 0},
                                        headers[index % len(headers)])  # fmt: skip

    return send


@dataclass(frozen=True)
class Target:
    url: str
    send: Send
    expect: int  # the status of a successful request
    server: Server  # whose CPU is measured: for the direct target, the simulator's
    following: Following | None = None  # a gateway's: it goes on polling and releasing each task after answering


async def main(quick: bool) -> str:
    raise_fd_limit()
    rounds = 2 if quick else 3
    following = QUICK if quick else FULL
    # Requests per run at each number of clients: a quick run measures the goal's load alone (16, closed and paced).
    requests = {PACED_CLIENTS: 160} if quick else {1: 120, 16: 400, 64: 640}
    most_paced = 32 if quick else 200  # requests counted per paced run, at most: PACED_WINDOW_S at the pace
    warm_up = 64 if quick else 200  # each client's connection, the caches, JWTs and Lua scripts: a few requests each
    accounts = accounts_for((3 + 2 * ACCOUNTS_PER_GATEWAY) * ACCOUNT_SLOTS)
    direct_account, floor_account, redis_floor_account = accounts[0], accounts[1], accounts[2]
    memory_accounts, redis_accounts = accounts[3:7], accounts[7:11]
    with redis_server() as redis_url:
        async with contextlib.AsyncExitStack() as stack:
            kling = SimulatorProcess(following.task_s, accounts)
            sim, memory, redis, ceiling, floor, redis_floor = await enter_together(
                stack,
                kling,
                gateway(kling.url, first_query_s=following.first_query_s),
                gateway(kling.url, redis_url=redis_url, first_query_s=following.first_query_s),
                served("bench.apps:ceiling_app", {}),
                floor_server("bench.apps:floor_app", kling.url, floor_account),
                floor_server("bench.apps:floor_app", kling.url, redis_floor_account, redis_url),
            )
            targets = {
                DIRECT: Target(sim.url, direct_sender(
                    KlingCredentials(direct_account.access_key, direct_account.secret_key)), 200, sim),
                MEMORY_GATEWAY: Target(memory.url, rest_sender(await api_keys(memory.url, memory_accounts)),
                                                202, memory, following),
                REDIS_GATEWAY: Target(redis.url, rest_sender(await api_keys(redis.url, redis_accounts)), 202, redis,
                                         following),
                FLOOR: Target(floor.url, rest_sender(["-"]), 202, floor),
                REDIS_FLOOR: Target(redis_floor.url, rest_sender(["-"]), 202, redis_floor),
                CEILING: Target(ceiling.url, rest_sender(["-"]), 202, ceiling),
            }  # fmt: skip
            for target in targets.values():
                await with_server_cpu(target.server, warm_up, closed_contender(target, 16, warm_up),
                                      following=target.following)  # fmt: skip
            slow = SlowCommands(redis_url)
            stack.push_async_callback(slow.aclose)
            watched = {name: slow if name in ON_REDIS else None for name in targets}
            results: dict[str, dict[str, list[Run]]] = {}
            pace, paced_requests = PACED_PER_SECOND, most_paced
            for clients, count in requests.items():
                closed = {name: measured(target, count, closed_contender(target, clients, count), watched[name])
                          for name, target in targets.items()}  # fmt: skip
                results[str(clients)] = await alternating(rounds, closed)
                if clients == PACED_CLIENTS:  # right after the closed loop whose rates set the pace
                    pace = pace_below(results[str(clients)], [name for name, t in targets.items() if t.following])
                    paced_requests = min(most_paced, round(PACED_WINDOW_S * pace))
                    # Only a gateway has a steady state to reach: it follows earlier tasks.
                    lead_ins = {name: round(PACED_LEAD_IN_S * pace) if t.following and not quick else 0
                                for name, t in targets.items()}  # fmt: skip
                    at_pace = {name: measured(target, lead_ins[name] + paced_requests,
                                              paced_contender(target, pace, paced_requests, lead_ins[name]),
                                              watched[name])
                               for name, target in targets.items()}  # fmt: skip
                    results[paced_load(pace)] = await alternating(rounds, at_pace)
            outbound = await outbound_cpu_ms(sim.url, direct_account, creates=50 if quick else 200, rounds=rounds)
            reads = {name: await status_reads_per_task(t.url) for name, t in targets.items() if t.following}
    body = render(results, outbound, reads, rounds, requests, pace, paced_requests, following)
    write_section("overhead", body)
    write_summary("overhead", findings(results, pace), quick=quick)
    return body


def findings(results: dict[str, dict[str, list[Run]]], pace: float) -> list[Finding]:
    """The summary's rows: the latency goal at 16 clients, paced and closed, each gateway against the direct create
    and its own work over its floor; the REST ceiling; what one worker sustains."""
    rows = []
    for load, label in goal_loads(pace).items():
        by_target = results[load]
        for name, store in VERDICT_GATEWAYS.items():
            total, own = added(by_target[name], by_target[DIRECT]), added(by_target[name], by_target[FLOOR_OF[name]])
            rows.append(Finding(
                f"Added latency p50 / p99, {label}, {store}",
                f"{total[0]:+.2f} / {total[1]:+.2f} ms (p50 by round {p50_by_round(by_target[name], by_target[DIRECT])};"
                f" {halves_against_goal(*total)});"
                f" own work over the floor {own[0]:+.2f} / {own[1]:+.2f} ms"
                f" ({'within' if within_goal(*own) else 'over'} the goal)",
                f"< {GOAL_P50_MS:g} / < {GOAL_P99_MS:g} ms", within_goal(*total),
            ))  # fmt: skip
    at_pace = results[paced_load(pace)]
    if all(has_server_timing(at_pace[name]) for name in VERDICT_GATEWAYS):
        rows.append(Finding(
            f"The gateway's own time per request as it reports it (`Server-Timing`), p50 / p99, 16 clients paced at "
            f"{pace:.0f} req/s, memory store and Redis (LiteLLM publishes 2 ms at p50 and 8 ms at p95, read from its "
            "overhead header)",
            " and ".join("{:.2f} / {:.2f} ms".format(*reported_own_time(at_pace[name])) for name in VERDICT_GATEWAYS),
        ))  # fmt: skip
    closed = results[str(PACED_CLIENTS)]
    rate = {name: median([run.per_second for run in closed[name]]) for name in (*VERDICT_GATEWAYS, CEILING)}
    rows.append(Finding(
        "Requests/s at 16 clients, closed loop: gateway (memory store, Redis) against a bare FastAPI endpoint",
        " and ".join(f"{rate[name]:,.0f}" for name in VERDICT_GATEWAYS) + f" against {rate[CEILING]:,.0f}",
    ))  # fmt: skip
    rows.append(Finding(
        "Tasks/s one worker takes on a core of its own (memory store, Redis), from its CPU per task",
        " and ".join(f"{1000 / cpu_ms(closed[name]):,.0f}" for name in VERDICT_GATEWAYS),
    ))  # fmt: skip
    return rows


async def outbound_cpu_ms(kling_url: str, account: SimAccount, *, creates: int, rounds: int) -> dict[str, float]:
    """CPU of this process per create sent to the simulator one at a time: through the gateway's Kling client,
    through httpcore2's pool alone (the same request as that client sends, without its deadline, breaker, metrics,
    span and typed answer) and through the benchmark's minimal client (`bench.http`), alternating; the median per
    client over the rounds. Each builds the same body, signs the same JWT (cached) and decodes the answer."""
    credentials = KlingCredentials(account.access_key, account.secret_key)
    kling, pool, jwts = FloorKling(kling_url, credentials), create_kling_pool(), JwtCache()
    minimal, connection = direct_sender(credentials), Connection(kling_url)
    url = httpx2.URL(kling_url)
    target = httpcore2.URL(scheme=url.scheme, host=url.host, port=url.port, target=GENERATIONS_PATH)

    def per_create(send: Callable[[int], Awaitable[object]]) -> Callable[[], Awaitable[float]]:
        async def measure() -> float:
            started = time.process_time()
            for index in range(creates):
                await send(index)
            return (time.process_time() - started) * 1000 / creates

        return measure

    async def through_pool(_: int) -> object:
        body = build_generation_body(GenerateRequest(prompt=PROMPT), external_task_id=f"kgw-{uuid.uuid4().hex}")
        headers, content = encode_call(jwts.token(credentials), body)
        response = await pool.request("POST", target, headers=headers, content=content,
                                      extensions={"timeout": TIMEOUTS})  # fmt: skip
        return _created(response.status, response.content)

    async def through_minimal(index: int) -> object:
        reply = await minimal(connection, index)
        return _created(reply.status, reply.body)

    contenders = {OUTBOUND_CLIENT: per_create(lambda _: kling.create(GenerateRequest(prompt=PROMPT))),
                  OUTBOUND_POOL: per_create(through_pool), OUTBOUND_MINIMAL: per_create(through_minimal)}  # fmt: skip
    try:
        await alternating(1, contenders)  # warm up: connections, the JWT
        return {name: median(cpu) for name, cpu in (await alternating(rounds, contenders)).items()}
    finally:
        await kling.pool.aclose()
        await pool.aclose()
        await connection.close()


def _created(status: int, body: bytes) -> object:
    answer = json.loads(body)
    if status != 200 or answer.get("code") != 0:
        raise RuntimeError(f"the simulator answered {status}: {body[:200]!r}")
    return answer["data"]


async def status_reads_per_task(gateway_url: str) -> float:
    """Status reads (queries and list calls) the gateway sent Kling per task it created, over the whole run."""
    calls = await kling_calls(gateway_url)
    return (calls.get("query", 0.0) + calls.get("list", 0.0)) / max(1.0, calls.get("create", 0.0))


def pace_below(closed_loop: dict[str, list[Run]], gateways: Iterable[str]) -> float:
    """The paced rows' rate: PACED_SHARE of the slowest target's closed-loop rate, PACED_CPU_SHARE of the most tasks
    per second the costliest gateway's CPU per task would let one worker take on a core of its own, and at most
    PACED_PER_SECOND.
    The CPU bound matters where the closed loop flatters a gateway: its runs end before most of their tasks' status
    queries, which a paced run long enough to reach its steady state carries in full."""
    rates = [median([run.per_second for run in runs]) for runs in closed_loop.values()]
    most_cpu_ms = max(median([run.server_cpu_ms or 0.0 for run in closed_loop[name]]) for name in gateways)
    return min(PACED_PER_SECOND, PACED_SHARE * min(rates), PACED_CPU_SHARE * 1000 / most_cpu_ms)


def measured(
    target: Target, requests: int, load: Callable[[], Awaitable[Run]], slow: SlowCommands | None = None
) -> Callable[[], Awaitable[Run]]:
    """`load` with the server's CPU per request, and with `slow`, how often its Redis was slow meanwhile."""

    async def run() -> Run:
        return await with_server_cpu(target.server, requests, load, following=target.following)

    return run if slow is None else slow.watching(requests, run)


def closed_contender(target: Target, clients: int, requests: int) -> Callable[[], Awaitable[Run]]:
    return lambda: closed_loop(target.url, target.send, clients=clients, requests=requests, expect=target.expect)


def paced_contender(target: Target, per_second: float, requests: int, lead_in: int) -> Callable[[], Awaitable[Run]]:
    return lambda: paced(target.url, target.send, clients=PACED_CLIENTS, per_second=per_second, requests=requests,
                         expect=target.expect, lead_in=lead_in)  # fmt: skip


def host_tail(direct_p99: float, p99: float) -> str:
    """A word when the direct target's p99 is above a gateway's: its runs met a stall of the host, not a slower
    server (the simulator called directly does a part of the gateway's work), so this run's added p99 means nothing."""
    if p99 >= direct_p99:
        return ""
    return (f"(Below zero at p99: the simulator called directly had the longer tail, {direct_p99:.2f} ms, from a "
            "stall of the host during its runs; the comparison with the floor is the one to read.) ")  # fmt: skip


def goal_loads(pace: float) -> dict[str, str]:
    """The loads the latency goal is judged at (16 clients, paced first), by their key in the results: their labels."""
    return {paced_load(pace): f"16 clients paced at {pace:.0f} req/s", str(PACED_CLIENTS): "16 clients, closed loop"}


def added(runs: list[Run], over: list[Run]) -> tuple[float, float]:
    """(p50, p99) of `runs` minus those of `over`: the medians over the rounds, the p99s over all their requests."""
    return (median([r.p50_ms for r in runs]) - median([r.p50_ms for r in over]),
            pooled_p99_ms(runs) - pooled_p99_ms(over))  # fmt: skip


def p50_by_round(runs: list[Run], over: list[Run]) -> str:
    """The range of the added p50 over the rounds, each round against the run of `over` beside it: how far one
    round's figure moves with the host."""
    per_round = [run.p50_ms - base.p50_ms for run, base in zip(runs, over, strict=True)]
    return f"{min(per_round):+.2f} to {max(per_round):+.2f}"


def halves_against_goal(p50: float, p99: float) -> str:
    """Which of the goal's two halves a figure meets: the summary's one verdict needs both."""
    return (f"p50 {'within' if p50 < GOAL_P50_MS else 'over'} {GOAL_P50_MS:g} ms, "
            f"p99 {'within' if p99 < GOAL_P99_MS else 'over'} {GOAL_P99_MS:g} ms")  # fmt: skip


def has_server_timing(runs: list[Run]) -> bool:
    return any(run.server_timings_ms for run in runs)


def reported_own_time(runs: list[Run]) -> tuple[float, float]:
    """(p50, p99) of the gateway's own `Server-Timing: gateway;dur=` over the runs: the median of the rounds' p50s
    and the p99 of all their requests together, as for the latencies."""
    timed = [run.server_timings_ms for run in runs if run.server_timings_ms]
    return median([percentile(timings, 0.50) for timings in timed]), percentile([t for ts in timed for t in ts], 0.99)


def within_goal(p50: float, p99: float) -> bool:
    return p50 < GOAL_P50_MS and p99 < GOAL_P99_MS


def own_work(by_target: dict[str, list[Run]], gateway_name: str) -> str:
    """What a gateway adds over the floor: its own work, apart from what FastAPI and one Kling call cost."""
    gateway, floor, direct = by_target[gateway_name], by_target[FLOOR_OF[gateway_name]], by_target[DIRECT]
    floor_p50, floor_p99 = added(floor, direct)
    own_p50, own_p99 = added(gateway, floor)
    gateway_cpu, floor_cpu = cpu_ms(gateway), cpu_ms(floor)
    within = within_goal(own_p50, own_p99)
    floor_is = FLOOR_SAYS[FLOOR_OF[gateway_name]]
    return (
        f"Of that, the floor ({floor_is}) adds {floor_p50:.2f} ms at p50 and {floor_p99:.2f} ms at p99, and the "
        f"gateway's own work {own_p50:+.2f} ms and {own_p99:+.2f} ms over it "
        f"({'within' if within else 'not within'} the goal's {GOAL_P50_MS:g} ms and {GOAL_P99_MS:g} ms). In CPU, a "
        f"task costs the gateway {gateway_cpu:.2f} ms over its whole life and a request the floor {floor_cpu:.2f} ms: "
        f"{gateway_cpu - floor_cpu:.2f} ms of the gateway's own.{slow_commands(gateway, floor)}"
    )


def floor_share(paced_runs: dict[str, list[Run]]) -> str:
    """What the paced floor alone adds against the goal, and its share of what the memory-store gateway adds: the
    part any gateway on this stack pays, so the part of the goal left to the gateway's own work."""
    gateway_p50 = added(paced_runs[MEMORY_GATEWAY], paced_runs[DIRECT])[0]
    floor_p50, floor_p99 = added(paced_runs[FLOOR], paced_runs[DIRECT])
    if floor_p50 >= GOAL_P50_MS:
        left = f"is over the goal's {GOAL_P50_MS:g} ms at p50 by itself here"
    else:
        left = f"leaves the gateway's own work {GOAL_P50_MS - floor_p50:.2f} ms of the goal's {GOAL_P50_MS:g} ms at p50"
    share = (
        f", {floor_p50 / gateway_p50:.0%} of the memory-store gateway's {gateway_p50:+.2f} ms"
        if gateway_p50 > 0
        else ""
    )
    return (f"Any gateway on this stack receives the request through uvicorn and FastAPI and sends it on through an "
            f"HTTP client. Paced, that alone (the floor) added {floor_p50:+.2f} ms at p50{share}, and "
            f"{floor_p99:+.2f} ms at p99: it {left}.")  # fmt: skip


def slow_commands(gateway: list[Run], floor: list[Run]) -> str:
    """How often redis-server itself was slow during the runs of a gateway with Redis and of its floor."""
    on_gateway, on_floor = slow_per_thousand(gateway), slow_per_thousand(floor)
    if on_gateway is None or on_floor is None:
        return ""
    if on_gateway == on_floor == 0:
        return f" Meanwhile redis-server ran every command within {SLOW_COMMAND_US / 1000:g} ms."
    return (f" Meanwhile redis-server took over {SLOW_COMMAND_US / 1000:g} ms to run {on_gateway:.1f} commands per "
            f"1,000 requests ({on_floor:.1f} in the floor's runs): it runs each in tens of µs, so each of those "
            "waited for a core while it ran.")  # fmt: skip


def cpu_ms(runs: list[Run]) -> float:
    """The server's CPU per request, median over the runs."""
    return median([run.server_cpu_ms or 0.0 for run in runs])


def paced_load(per_second: float) -> str:
    return f"{PACED_CLIENTS}, paced at {per_second:.0f} req/s"


def render(
    results: dict[str, dict[str, list[Run]]],
    outbound: dict[str, float],
    reads: dict[str, float],
    rounds: int,
    requests: dict[int, int],
    pace: float,
    paced_requests: int,
    following: Following,
) -> str:
    quick = following == QUICK
    labels = goal_loads(pace)
    rows, verdicts = [], []
    for load, by_target in results.items():
        base = by_target[DIRECT]
        base_p50, base_p99 = median([r.p50_ms for r in base]), pooled_p99_ms(base)
        for name, runs in by_target.items():
            p50, p99, rate = median([r.p50_ms for r in runs]), pooled_p99_ms(runs), median(
                [r.per_second for r in runs])  # fmt: skip
            proxies = name.startswith("gateway") or name in FLOORS
            added_cells = f"{p50 - base_p50:+.2f} | {p99 - base_p99:+.2f}" if proxies else "| "
            timing = "{:.2f} / {:.2f}".format(*reported_own_time(runs)) if has_server_timing(runs) else "–"
            rows.append(f"| {load} | {name} | {p50:.2f} | {p99:.2f} | {rate:,.0f} | {added_cells} | {timing} | "
                        f"{cpu_ms(runs):.2f} | {steal_percent(runs):.1f} |")  # fmt: skip
            if load in labels and name in VERDICT_GATEWAYS:
                met = within_goal(p50 - base_p50, p99 - base_p99)
                verdicts.append(f"- {labels[load]}: the gateway ({VERDICT_GATEWAYS[name]}) adds {p50 - base_p50:.2f} ms "
                                f"at p50 (by round, {p50_by_round(runs, base)}) and {p99 - base_p99:.2f} ms at p99: the goal (< {GOAL_P50_MS:g} ms, "
                                f"< {GOAL_P99_MS:g} ms) is **{'met' if met else 'not met'}**. "
                                f"{host_tail(base_p99, p99)}{own_work(by_target, name)}")  # fmt: skip
    busy, at_pace = results[str(PACED_CLIENTS)], results[paced_load(pace)]
    capacity = ", ".join(
        f"**{1000 / cpu_ms(busy[name]):,.0f}** tasks/s ({store})" for name, store in VERDICT_GATEWAYS.items()
    )
    costs = "; ".join(f"{store}, {cpu_ms(busy[name]):.2f} ms busy and {cpu_ms(at_pace[name]):.2f} ms paced, which kept "
                      f"the worker busy {cpu_ms(at_pace[name]) * pace / 1000:.0%} of the time" for name, store in VERDICT_GATEWAYS.items())  # fmt: skip
    if quick:
        lead_in_note = ("This quick run measures 16 clients only, and its paced runs send no requests before those "
                        "counted, so the gateways' status queries of their first tasks fall after them.")  # fmt: skip
    else:
        lead_in_note = (f"Each paced run of a gateway starts with {round(PACED_LEAD_IN_S * pace)} requests "
                        f"({PACED_LEAD_IN_S:g} s) sent but not counted: it reads each task's status about "
                        f"{following.read_after_s:g} s after creating it, so the counted requests meet it in its "
                        "steady state, following the earlier tasks as it would in service.")  # fmt: skip
    per_task = " and ".join(f"{n:.2f} status reads per task ({VERDICT_GATEWAYS[name]})" for name, n in reads.items())
    reads_note = (f" Over this run, the gateways sent Kling {per_task} (queries and list calls: a list call answers "
                  "the reads of one account that fall due together).")  # fmt: skip
    following_note = (f" (`KGW_POLL_INTERVAL_SECONDS`; {DEFAULT_FIRST_QUERY_S:g} s by default: sooner, so a quick run ends "
                      "sooner, though more of its reads share list calls, which makes a task's CPU about a tenth "
                      "lower)") if quick else ", the default"  # fmt: skip
    command = "python -m bench.overhead" + (" --quick" if quick else "")
    return f"""## Gateway-added latency and the REST ceiling (`{command}`)

Run {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}. `POST /generate` with `wait_seconds: 0` through one
gateway worker, against the same create (same body, a JWT signed by the client) sent straight to the simulator's
`POST /v1/images/generations`, a bare FastAPI endpoint that parses a small JSON body, and the floor: a FastAPI route
that takes the same body and sends the same create through the gateway's own Kling client (its pool, JWT cache and
timeouts), doing nothing else; and the floor with Redis: that route plus what any gateway keeping its limits and
tasks in Redis must do around the create, a script before it (the admission) and a write after it (the task's
record), one round trip each on the gateway's Redis client to the Redis the gateway uses. Each server runs in its own process under the same uvicorn settings; clients are
keep-alive connections. In the closed-loop rows each client sends its next request as soon as the last is answered ({", ".join(f"{n} requests at {c}" for c, n in requests.items())} per run);
in the paced rows {PACED_CLIENTS} clients share a fixed schedule of {pace:.0f} requests per second ({paced_requests} counted per
run). The pace is the lowest of {PACED_SHARE:.0%} of the slowest target's closed-loop rate at 16 clients in this run, a
third of the tasks per second one worker could take at the costliest gateway's CPU per task in that closed loop (a
paced task costs about half as much again, so that worker is about half busy), and {PACED_PER_SECOND:.0f}: every
target keeps up. {lead_in_note} Each latency is counted from the request's due time. The six targets run in turn, {rounds} rounds; each figure is the median over the
rounds but p99, which is over all the rounds' requests together (one run's p99 is one of its few slowest requests,
the third of 200: the rounds together give it three times as many to rest on). "added" is a percentile minus the direct one; `Server-Timing` is the p50 and p99 (taken
the same way) of the gateway's own `gateway;dur` header, which is how LiteLLM's published overhead is read (its
`x-litellm-overhead-duration-ms`). That is the request's time outside Kling calls and waits, so on a saturated worker (the closed
loops at 16 clients or more) it also holds the time the request's next step waited behind other requests' work on the event
loop. **Server CPU** is the CPU time of the process serving the target (for the direct target, the simulator) per
request; a gateway's run is followed to its end, until it follows none of its tasks, so its figure holds each task's
whole life (status queries, recording, releases), and no target's run carries another's leftover work. **Steal**
is the share of the machine's CPU time that the hypervisor gave to other virtual machines while this one had work
(/proc/stat), over the target's runs together: on a shared host it comes in bursts, and a core taken away for a few
ms stalls whatever ran on it, so a p99 measured while it was high holds the host's stalls as well as the server's.

| clients | target | p50 ms | p99 ms | requests/s | added p50 ms | added p99 ms | `Server-Timing` p50 / p99 ms | server CPU ms per request | steal % |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{chr(10).join(verdicts)}

**What one worker sustains.** A task costs a gateway less CPU over its whole life when the worker is busy (the
closed loop at 16 clients, where one wake-up serves several requests) than when paced (each request, status query
and Redis answer wakes it): {costs}. So one worker on a core of its own takes at most about {capacity}; on this
machine it shares its two cores with the client, the simulator and redis-server. This is the figure to size a
deployment's replicas by, with headroom.

**Why the closed loop at 16 clients cannot meet the goal here.** With 16 clients always waiting, the latency is
16 ÷ the server's throughput (Little's law), so "added" is 16 ÷ the gateway's rate minus 16 ÷ the simulator's.
Under 1 ms added would need the gateway to answer about as many requests per second as the simulator alone,
which is more than the bare FastAPI endpoint manages at one client: the gateway does everything that endpoint
does, then a Kling call of its own (the simulator's whole work) on the same two cores. The paced rows are the
fair reading of the goal: the same 16 clients at a rate the worker keeps up with, so each figure is what the
gateway adds to a request rather than the queue in front of a saturated worker.

**How much of what the gateway adds is the floor.** {floor_share(at_pace)} The
sending part was measured in this run, in the benchmark's own process: creates sent to the simulator one at a time,
{rounds} rounds alternating, medians. A create costs **{outbound[OUTBOUND_CLIENT]:.2f} ms** of CPU through the
gateway's Kling client, {outbound[OUTBOUND_POOL]:.2f} ms through httpcore2's pool alone (HTTP/1.1 in pure Python,
with h11; the same request, without the client's deadline, breaker, metrics, span and typed answer), and
{outbound[OUTBOUND_MINIMAL]:.2f} ms through the benchmark's minimal client. Each builds the same body, signs the same
cached JWT and decodes the answer. What the gateway's design decides is its own work over the floor, given in each
verdict above. With Redis, the floor also holds the two round trips
that keeping limits and tasks in Redis cannot do without, one before the create and one after it; what the
Redis gateway adds over that floor is its own: a second script in the admission's round trip (the account's
slots), two more round trips as tasks end (shared by the tasks one list call answers), and a worker about twice as
busy, where every one of those waits queues behind the others' work.
How much of its paced p99 is the work of ending earlier tasks, `python -m bench.tail --redis` measures: the same
gateway twice, side by side, one reading each task's status after 1 s and one after 60 s, with where the slowest
requests spent their time and whether redis-server or the host was slow meanwhile.

The gateway's path includes what the direct path does not: authenticating the key, the tenant's rate, concurrency
and daily limits, the Kling account's slots, usage counters (with Redis, counted in the worker and written once a
second), recording the task, and following it, all in the same worker. With Redis these are round trips to a local
redis-server: two before the answer (the limits and the account's slots, together; the record) and two after
it, as the task ends, shared by the tasks that end together (bench.limiter counts them). The simulator ends each task {following.task_s:g} s
after its create, and the gateways query its status first {following.first_query_s or DEFAULT_FIRST_QUERY_S:g} s after
it{following_note}: that read finds the task ended.{reads_note} The simulator, the gateway and the client share the machine's two cores,
so throughput at 16 clients or more is bounded by the whole set, not by the gateway alone.
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds (a few seconds each)")
    print(asyncio.run(main(parser.parse_args().quick)))
