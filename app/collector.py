"""Python's garbage collector, scheduled for a server that holds thousands of waiting requests.

Each waiting request keeps a few hundred objects the collector tracks (its coroutines down the ASGI stack, their
closures, events, timers). CPython collects its oldest generation whenever it has grown by a quarter, and such a
full collection walks every tracked object with the event loop stopped: with 10,000 waiters that measured 1.5 s,
every time a few thousand new waiters had come in, while it found almost nothing to free (docs/benchmarks.md,
waiting capacity). The young generations still find nearly all of the garbage, which is short-lived.

So while the gateway serves: what start-up built is frozen out of every collection (it lives as long as the
process), the young generations are collected as usual, and the full collection runs on a clock instead of on
growth, for the rare cycles among long-lived objects (a waiter that ended with an exception, say).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator

logger = logging.getLogger(__name__)
NEVER = 2**31 - 1  # an oldest-generation threshold that is never reached: only the clock starts a full collection


@contextlib.asynccontextmanager
async def full_collections_every(seconds: float) -> AsyncIterator[None]:
    """Full collections every `seconds` instead of on growth, start-up objects frozen; 0 leaves Python's
    defaults. Restored on exit."""
    if seconds <= 0:
        yield
        return
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(thresholds[0], thresholds[1], NEVER)
    collecting = asyncio.create_task(_collect_every(seconds), name="full garbage collections")
    try:
        yield
    finally:
        collecting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collecting
        gc.set_threshold(*thresholds)
        gc.unfreeze()


async def _collect_every(seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        started = time.perf_counter()
        freed = gc.collect()
        logger.info(
            "full garbage collection: %d objects freed in %.0f ms", freed, (time.perf_counter() - started) * 1000
        )
