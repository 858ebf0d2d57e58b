"""Every benchmark, one after the other, each rewriting its section of docs/benchmarks.md:

    python -m bench [--quick] [--only overhead,mcp,waiting,limiter,profile]

`make bench` and `make bench-quick` run this. Servers are started on 127.0.0.1 and stopped by the benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

from bench import hotpath, limiter, mcp_calls, overhead, waiting
from bench.report import machine_section, write_section

SUITES: dict[str, Callable[[bool], Awaitable[object]]] = {
    "overhead": overhead.main,
    "mcp": mcp_calls.main,
    "waiting": waiting.main,
    "limiter": limiter.main,
    "profile": hotpath.main,
}


async def run(quick: bool, only: list[str]) -> None:
    write_section("machine", machine_section("python -m bench" + (" --quick" if quick else "")), first=True)
    for name in only:
        started = time.monotonic()
        await SUITES[name](quick)
        print(f"{name}: done in {time.monotonic() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests, rounds and waiters: about a minute")
    parser.add_argument("--only", default=",".join(SUITES), help="comma-separated benchmarks to run")
    args = parser.parse_args()
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(only) - SUITES.keys()
    if unknown:
        parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))}; known: {', '.join(SUITES)}")
    started = time.monotonic()
    asyncio.run(run(args.quick, only))
    print(f"all done in {time.monotonic() - started:.0f} s; results in docs/benchmarks.md", flush=True)


if __name__ == "__main__":
    main()
