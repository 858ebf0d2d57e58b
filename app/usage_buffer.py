"""Usage counted in the process and written to its store in batches, off the request path.

Counting a request in Redis as it is served costs each request a round trip: about 0.4 ms of its latency here,
paced, and 0.1 ms of the worker's CPU (docs/benchmarks.md). Usage is bookkeeping, not a limit (the limiter
enforces those, in Redis, as each request arrives), so it can wait: requests add to counters in memory, and
every `KGW_USAGE_FLUSH_SECONDS` each (tenant, key, day) counted since is written with one round trip, however
many requests it holds. Each process (each worker of `serve --workers N`) counts its own requests: a read of usage
through the process that counted them writes them first, so it is exact at once; reads elsewhere see them within
the interval. What a process holds when it stops is written as it stops. One that crashes loses what it had not
written: an interval's counts, or all it counted while Redis was unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import date

from redis.exceptions import RedisError

from app.usage import DailyUsage, UsageStore, check_growth, utc_today

logger = logging.getLogger(__name__)

_Slot = tuple[str, str, date]  # tenant id, key id, UTC day


class BufferedUsage:
    """A UsageStore that counts in memory and writes to `store` on `flush()` (and before every read)."""

    def __init__(self, store: UsageStore) -> None:
        self._store = store
        self._pending: dict[_Slot, Counter[str]] = {}
        # One flush at a time: a read must not answer while an earlier flush still writes what it took.
        self._flushing = asyncio.Lock()
        self._failing = False  # the last flush failed: reads stop trying until a periodic flush gets through

    @property
    def pending(self) -> int:
        """How many (tenant, key, day) counters wait to be written."""
        return len(self._pending)

    async def record(
        self,
        tenant_id: str,
        key_id: str,
        *,
        requests: int = 0,
        tasks: int = 0,
        images: int = 0,
        day: date | None = None,
    ) -> None:
        check_growth(requests, tasks, images)  # now, not at the flush, where nobody would hear it
        if requests or tasks or images:
            counts = self._pending.setdefault((tenant_id, key_id, day or utc_today()), Counter())
            counts["requests"] += requests
            counts["tasks"] += tasks
            counts["images"] += images

    async def flush(self, *, unless_failing: bool = False) -> None:
        """Write what was counted so far. What cannot be written is kept for the next flush; raises the store's
        failure after putting it back. `unless_failing`: do nothing while the last flush failed."""
        async with self._flushing:
            if unless_failing and self._failing:
                return
            taken, self._pending = self._pending, {}
            slots = list(taken.items())
            for index, ((tenant_id, key_id, day), counts) in enumerate(slots):
                try:
                    await self._store.record(tenant_id, key_id, day=day, **counts)
                except BaseException:
                    # Kept for the next flush: what failed (Redis away, or refusing writes) wrote nothing. A record
                    # that Redis ran but whose answer was lost (a timeout) counts twice: rarer, and a smaller error
                    # than dropping counts.
                    self._put_back(slots[index:])
                    self._failing = True
                    raise
            self._failing = False

    def _put_back(self, slots: Sequence[tuple[_Slot, Counter[str]]]) -> None:
        for slot, counts in slots:
            self._pending.setdefault(slot, Counter()).update(counts)

    async def tenant_usage(self, tenant_id: str, days: int = 30, *, today: date | None = None) -> list[DailyUsage]:
        await self._flush_before_read()
        return await self._store.tenant_usage(tenant_id, days, today=today)

    async def tenants_usage(
        self, tenant_ids: Sequence[str], days: int = 30, *, today: date | None = None
    ) -> dict[str, list[DailyUsage]]:
        await self._flush_before_read()
        return await self._store.tenants_usage(tenant_ids, days, today=today)

    async def _flush_before_read(self) -> None:
        """Not while flushes fail: each reader would wait out Redis's timeout in turn, behind the lock, before its
        own read. Shielded: a reader that hangs up must not cut off a write Redis may have run (it would be put
        back and counted twice)."""
        await asyncio.shield(self._flush_quietly(unless_failing=True))

    async def _flush_quietly(self, *, unless_failing: bool = False) -> None:
        """Flush; a failure is logged, not raised (the counts wait for the next flush)."""
        try:
            await self.flush(unless_failing=unless_failing)
        except (RedisError, OSError) as exc:
            logger.warning("could not write usage counts (%d waiting): %s", self.pending, type(exc).__name__)

    @contextlib.asynccontextmanager
    async def flushing_every(self, seconds: float) -> AsyncIterator[None]:
        """Flush every `seconds` while inside, and once more on the way out (a stopping replica keeps nothing).
        The writer is asked to stop rather than cancelled: a write cut off after Redis ran it would be put back
        and counted twice."""
        stop = asyncio.Event()
        writer = asyncio.create_task(self._flush_until(stop, seconds), name="usage writer")
        try:
            yield
        finally:
            stop.set()
            await writer

    async def _flush_until(self, stop: asyncio.Event, seconds: float) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await stop.wait()
            # Read before the flush: a stop asked during it needs one more, for what was counted meanwhile.
            stopping = stop.is_set()
            try:
                await self._flush_quietly()
            except Exception:
                logger.exception("writing usage counts failed unexpectedly; trying again at the next interval")
            if stopping:
                return
