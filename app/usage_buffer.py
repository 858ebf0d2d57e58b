"""Usage counted in the process and written to its store in batches, off the request path.

Counting a request in Redis as it is served costs each request a round trip: about 0.4 ms of its latency here,
paced, and 0.1 ms of the worker's CPU (docs/benchmarks.md). Usage is bookkeeping, not a limit (the limiter
enforces those, in Redis, as each request arrives), so it can wait: requests add to counters in memory, and
every `KGW_USAGE_FLUSH_SECONDS` each (tenant, key, day) counted since is written with one round trip, however
many requests it holds. A read of usage through this replica writes what it holds first, so a caller sees its own
requests at once; another replica's show within the interval. What a replica holds when it stops is written as
it stops; a replica that crashes loses at most one interval of counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import date

from redis.exceptions import RedisError

from app.usage import DailyUsage, UsageStore, utc_today

logger = logging.getLogger(__name__)

_Slot = tuple[str, str, date]  # tenant id, key id, UTC day


class BufferedUsage:
    """A UsageStore that counts in memory and writes to `store` on `flush()` (and before every read)."""

    def __init__(self, store: UsageStore) -> None:
        self._store = store
        self._pending: dict[_Slot, Counter[str]] = {}
        # One flush at a time: a read must not answer while an earlier flush still writes what it took.
        self._flushing = asyncio.Lock()

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
        amounts = {"requests": requests, "tasks": tasks, "images": images}
        if any(amount < 0 for amount in amounts.values()):
            raise ValueError(f"usage only grows: {amounts}")  # now, not at the flush, where nobody would hear it
        counts = Counter({name: amount for name, amount in amounts.items() if amount})
        if counts:
            self._pending.setdefault((tenant_id, key_id, day or utc_today()), Counter()).update(counts)

    async def flush(self) -> None:
        """Write what was counted so far. What cannot be written is kept for the next flush; raises the store's
        failure after putting it back."""
        async with self._flushing:
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
                    raise

    def _put_back(self, slots: Sequence[tuple[_Slot, Counter[str]]]) -> None:
        for slot, counts in slots:
            self._pending.setdefault(slot, Counter()).update(counts)

    async def tenant_usage(self, tenant_id: str, days: int = 30, *, today: date | None = None) -> list[DailyUsage]:
        await self._flush_quietly()
        return await self._store.tenant_usage(tenant_id, days, today=today)

    async def tenants_usage(
        self, tenant_ids: Sequence[str], days: int = 30, *, today: date | None = None
    ) -> dict[str, list[DailyUsage]]:
        await self._flush_quietly()
        return await self._store.tenants_usage(tenant_ids, days, today=today)

    async def _flush_quietly(self) -> bool:
        """Flush; a failure is logged, not raised (the counts wait for the next flush). True when written."""
        try:
            await self.flush()
        except (RedisError, OSError) as exc:
            logger.warning("could not write usage counts (%d waiting): %s", self.pending, type(exc).__name__)
            return False
        return True

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
            await self._flush_quietly()
            if stop.is_set():
                return
