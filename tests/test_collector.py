"""Full garbage collections on a clock while serving (app/collector.py): heap growth from thousands of waiting
requests no longer stops the event loop for a collection of every object."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from app.collector import full_collections_every

pytestmark = pytest.mark.anyio
OLDEST = 2  # CPython's generations are 0, 1 and 2


class FullCollections:
    """Counts the collections of the oldest generation while installed."""

    def __init__(self) -> None:
        self.count = 0
        self.happened = anyio.Event()

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info["generation"] == OLDEST:
            self.count += 1
            self.happened.set()


@pytest.fixture
def full_collections() -> Iterator[FullCollections]:
    watcher = FullCollections()
    gc.callbacks.append(watcher)
    yield watcher
    gc.callbacks.remove(watcher)


async def test_a_growing_heap_does_not_start_a_full_collection(full_collections: FullCollections) -> None:
    async with full_collections_every(3600):
        # Long-lived objects, as waiting requests keep: by default their growth starts full collections.
        kept = [{"waiter": index, "state": [index]} for index in range(400_000)]
        await anyio.lowlevel.checkpoint()
    assert full_collections.count == 0
    assert len(kept) == 400_000


async def test_full_collections_run_on_the_clock(full_collections: FullCollections) -> None:
    async with full_collections_every(0.05):
        with anyio.fail_after(5):
            await full_collections.happened.wait()


async def test_python_defaults_come_back_when_serving_ends() -> None:
    thresholds = gc.get_threshold()
    async with full_collections_every(60):
        assert gc.get_freeze_count() > 0  # what start-up built is out of every collection
    assert gc.get_threshold() == thresholds
    assert gc.get_freeze_count() == 0


async def test_zero_keeps_pythons_defaults() -> None:
    thresholds = gc.get_threshold()
    async with full_collections_every(0):
        assert gc.get_threshold() == thresholds
        assert gc.get_freeze_count() == 0
