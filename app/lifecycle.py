"""Draining: what the gateway does between SIGTERM and exit.

uvicorn stops accepting connections on SIGTERM and waits for open requests, but a request waiting for
Kling could hold the shutdown for minutes. So the gateway listens to the same signal: readiness turns
false at once, new submissions get 503, and every waiting caller is answered straight away with its task
as it stands (the task id, when not finished) instead of being cut off when the grace period ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from types import FrameType, TracebackType
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Drain:
    def __init__(self) -> None:
        self._draining = False
        # The waits to end the moment draining starts; a scope each, rather than a task each watching for the
        # start: thousands of callers may wait at once (bench.waiting), and a task costs far more to hold.
        self._waits: set[anyio.CancelScope] = set()

    @property
    def draining(self) -> bool:
        return self._draining

    def start(self) -> None:
        """Draining starts: new submissions are refused and every wait registered here ends now."""
        self._draining = True
        for scope in self._waits:
            scope.cancel()

    def ended_on_start(self) -> _EndedOnDrain:
        """A block that stops (as a cancelled one does, silently) when draining starts, or at once if it has."""
        return _EndedOnDrain(self)

    @contextlib.contextmanager
    def on_signals(self) -> Iterator[None]:
        """Start draining on SIGTERM/SIGINT, then let the server's own handler run as before."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signals only reach the main thread; a server run elsewhere drains on lifespan end
            return
        loop = asyncio.get_running_loop()
        previous = {sig: signal.getsignal(sig) for sig in SIGNALS}

        def handle(sig: int, frame: FrameType | None) -> None:
            if not self.draining:
                logger.info("draining: answering waiting callers and refusing new submissions")
            loop.call_soon_threadsafe(self.start)
            chained: Any = previous[signal.Signals(sig)]
            if callable(chained):
                chained(sig, frame)
            elif chained == signal.SIG_DFL:
                # Nobody else handles it: after starting to drain, let the signal do what it would have done.
                signal.signal(sig, signal.SIG_DFL)
                signal.raise_signal(sig)

        for sig in SIGNALS:
            signal.signal(sig, handle)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _EndedOnDrain:
    """`Drain.ended_on_start`'s block: a cancel scope registered with the drain while it runs. A class, not a
    generator: every waiting caller holds one, and a generator, its wrapper and the scope's bound exit are
    three objects more for the garbage collector to walk."""

    __slots__ = ("_drain", "_scope")

    def __init__(self, drain: Drain) -> None:
        self._drain = drain
        self._scope = anyio.CancelScope()

    def __enter__(self) -> None:
        self._scope.__enter__()
        if self._drain.draining:
            self._scope.cancel()
        self._drain._waits.add(self._scope)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        self._drain._waits.discard(self._scope)
        return bool(self._scope.__exit__(exc_type, exc, traceback))


@contextlib.asynccontextmanager
async def subscribed(
    redis: Redis | None, channel: str, on_message: Callable[[str], None], on_gap: Callable[[], None]
) -> AsyncIterator[None]:
    """For the app's lifetime, call `on_message` with each message on a Redis pub/sub `channel`, and `on_gap`
    on every (re)subscription, since messages sent while unsubscribed are lost. A no-op without Redis."""
    if redis is None:
        yield
        return
    ready = asyncio.Event()

    async def listen() -> None:
        while True:
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(channel)
                    on_gap()
                    ready.set()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            data = message["data"]
                            try:
                                on_message(data.decode() if isinstance(data, bytes) else str(data))
                            except Exception:  # one bad message (another version's?) must not end listening
                                logger.exception("could not handle a message on the %s channel", channel)
            except (RedisError, OSError, ValueError):
                logger.warning("lost the %s channel; resubscribing", channel)
                await asyncio.sleep(1.0)

    task = asyncio.create_task(listen(), name=f"subscribed {channel}")
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await ready.wait()
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
