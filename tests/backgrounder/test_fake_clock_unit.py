"""FakeClock on its own: wall and monotonic time, sleepers, advance rules."""

from __future__ import annotations

import asyncio
import math
import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest

from backgrounder import Clock
from backgrounder_testing import FakeClock


def test_fake_clock_is_a_clock_in_utc() -> None:
    """now() is aware UTC, monotonic() starts at 0, and it is a core Clock."""
    clock = FakeClock(datetime(2030, 5, 1, 12, tzinfo=timezone(timedelta(hours=2))))

    assert isinstance(clock, Clock)
    assert clock.now() == datetime(2030, 5, 1, 10, tzinfo=UTC)
    assert clock.now().utcoffset() == timedelta(0)
    assert clock.monotonic() == 0.0


def test_fake_clock_refuses_naive_start() -> None:
    """A start without a timezone is refused with the value shown."""
    with pytest.raises(ValueError, match="timezone-aware"):
        FakeClock(datetime(2030, 1, 1))


async def test_fake_clock_wakes_sleepers_in_deadline_order() -> None:
    """Sleepers wake in deadline order, ties in the order they began."""
    clock = FakeClock()
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [
        asyncio.create_task(sleeper(name, seconds))
        for name, seconds in [("c", 30), ("a", 10), ("b1", 20), ("b2", 20)]
    ]
    await clock.settle()
    assert clock.sleepers == 4

    clock.advance(25)
    await clock.settle()
    assert woke == ["a", "b1", "b2"]
    assert clock.sleepers == 1

    clock.advance(5)
    await asyncio.gather(*tasks)
    assert woke == ["a", "b1", "b2", "c"]
    assert clock.monotonic() == 30


async def test_fake_clock_wakes_nobody_before_the_deadline() -> None:
    """A sleeper is not woken a hair before its deadline, and is at it."""
    clock = FakeClock()
    task = asyncio.ensure_future(clock.sleep(10))

    clock.advance(9.999)
    await clock.settle()
    assert not task.done()

    clock.advance(0.001)
    await clock.settle()
    assert task.done()


async def test_fake_clock_takes_deadline_when_sleep_is_called() -> None:
    """A sleep wrapped in a task that has not run yet still counts from the call."""
    clock = FakeClock()
    task = asyncio.ensure_future(clock.sleep(5))
    clock.advance(5)

    async with asyncio.timeout(5):
        await task


@pytest.mark.parametrize(
    "seconds",
    [-1, -0.001, math.nan, math.inf],
    ids=["negative", "tiny-negative", "nan", "inf"],
)
def test_fake_clock_advance_refuses_bad_steps(seconds: float) -> None:
    """advance() never goes backwards or to infinity, and changes nothing then."""
    clock = FakeClock()
    before = clock.now()

    with pytest.raises(ValueError, match="advance"):
        clock.advance(seconds)

    assert clock.monotonic() == 0 and clock.now() == before


async def test_fake_clock_jump_wall_moves_wall_time_alone() -> None:
    """jump_wall() moves now() either way and wakes nobody (case B43)."""
    clock = FakeClock()
    start = clock.now()
    task = asyncio.ensure_future(clock.sleep(1))

    clock.jump_wall(3600)
    await clock.settle()
    assert clock.now() == start + timedelta(hours=1)
    assert clock.monotonic() == 0 and not task.done()

    clock.jump_wall(-7200)
    assert clock.now() == start - timedelta(hours=1)
    clock.advance(1)
    await task
    assert clock.now() == start - timedelta(hours=1) + timedelta(seconds=1)


async def test_fake_clock_forgets_canceled_sleepers() -> None:
    """A canceled sleep is not counted and does not disturb the others."""
    clock = FakeClock()
    canceled = asyncio.ensure_future(clock.sleep(1))
    kept = asyncio.ensure_future(clock.sleep(2))
    await clock.settle()
    canceled.cancel()
    await clock.settle()

    assert clock.sleepers == 1
    assert clock.next_deadline() == 2
    assert clock.advance_to_next() == 2
    await kept


async def test_fake_clock_advance_to_next_without_sleepers_moves_nothing() -> None:
    """advance_to_next() with nobody asleep returns None and keeps the time."""
    clock = FakeClock()
    assert clock.advance_to_next() is None
    assert clock.monotonic() == 0


async def test_fake_clock_zero_sleep_returns_at_once() -> None:
    """sleep(0) and negative sleeps only yield; NaN is refused."""
    clock = FakeClock()
    async with asyncio.timeout(1):
        await clock.sleep(0)
        await clock.sleep(-5)
    with pytest.raises(ValueError, match="NaN"):
        await clock.sleep(math.nan)


async def test_fake_clock_advance_from_another_thread_wakes_sleeper() -> None:
    """A sync runner's thread may advance the clock; the sleeper wakes on its loop."""
    clock = FakeClock()
    task = asyncio.ensure_future(clock.sleep(3))
    await clock.settle()

    thread = threading.Thread(target=clock.advance, args=(3,))
    thread.start()
    await asyncio.to_thread(thread.join)

    async with asyncio.timeout(5):
        await task
    assert clock.monotonic() == 3


async def test_fake_clock_does_not_keep_canceled_sleeps_forever() -> None:
    """Many sleeps canceled without any advance do not pile up."""
    clock = FakeClock()
    for _ in range(1000):
        sleeper = asyncio.ensure_future(clock.sleep(1))
        await asyncio.sleep(0)
        sleeper.cancel()
        await asyncio.sleep(0)

    assert clock.sleepers == 0
    assert len(clock._sleepers) < 200
