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


def grown_heap() -> list[dict[str, Any]]:
    """Long-lived objects, as waiting requests keep: by default their growth starts full collections."""
    return [{"waiter": index, "state": [index]} for index in range(400_000)]


async def test_a_growing_heap_does_not_start_a_full_collection(full_collections: FullCollections) -> None:
    async with full_collections_every(3600):
        kept = grown_heap()
        await anyio.lowlevel.checkpoint()
    assert full_collections.count == 0
    assert len(kept) == 400_000


@pytest.mark.parametrize("when", ["with a clock of 0", "after serving"])
async def test_otherwise_the_same_growth_starts_full_collections_as_python_does(
    when: str, full_collections: FullCollections
) -> None:
    if when == "after serving":
        async with full_collections_every(60):
            pass
        kept = grown_heap()
    else:
        async with full_collections_every(0):
            kept = grown_heap()
    assert full_collections.count > 0
    assert len(kept) == 400_000


async def test_full_collections_run_on_the_clock(full_collections: FullCollections) -> None:
    async with full_collections_every(0.05):
        with anyio.fail_after(5):
            await full_collections.happened.wait()


async def test_what_start_up_built_is_frozen_while_serving_only() -> None:
    async with full_collections_every(60):
        assert gc.get_freeze_count() > 0  # out of every collection
    assert gc.get_freeze_count() == 0
