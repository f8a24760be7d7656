"""FakeClock: time that moves only when a test says so."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import threading
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["FakeClock"]


class FakeClock:
    """A Clock whose time moves only on ``advance()``.

    ``now()`` is wall time (aware UTC) and ``monotonic()`` measures durations; both
    move together on ``advance()``, and ``jump_wall()`` moves the wall time alone,
    as NTP or an operator might. ``await sleep(s)`` waits until ``advance`` has
    moved monotonic time to its deadline.

    Woken sleepers run once the event loop gets control back, so after a plain
    ``advance()`` call ``await clock.settle()`` (or use ``advance_async``) to let
    them react. A FakeClock belongs to one event loop at a time; ``advance`` may
    be called from another thread (a sync runner's), and wakes sleepers through
    their loop.

    Added in 0.1.
    """

    def __init__(self, start: datetime | None = None) -> None:
        """Start at ``start`` (aware; default 2026-01-01 UTC) and monotonic 0.

        Raises:
            ValueError: ``start`` has no timezone.
        """
        if start is not None and start.tzinfo is None:
            raise ValueError(f"start must be timezone-aware (got {start!r})")
        self._wall = (
            start.astimezone(UTC) if start else datetime(2026, 1, 1, tzinfo=UTC)
        )
        self._mono = 0.0
        # A heap of (deadline, sequence, future); the sequence keeps sleepers with
        # one deadline in the order they started sleeping.
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        # Guards the heap and the times: a sync runner's thread may advance.
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return (
            f"FakeClock(now={self._wall.isoformat()}, monotonic={self._mono}, "
            f"sleepers={self.sleepers})"
        )

    # ------------------------------------------------------------ Clock

    def now(self) -> datetime:
        """Return the fake wall time, timezone-aware in UTC."""
        return self._wall

    def monotonic(self) -> float:
        """Return the fake monotonic time in seconds (0 at creation)."""
        return self._mono

    def sleep(self, seconds: float) -> Coroutine[Any, Any, None]:
        """Wait until the clock has been advanced by ``seconds``.

        The deadline is taken when ``sleep`` is called, not when the returned
        coroutine first runs: ``asyncio.ensure_future(clock.sleep(5))`` followed
        by ``advance(5)`` wakes it even if the task had not started yet. Zero or
        a negative value only yields to the event loop once, as
        ``asyncio.sleep`` does.

        Raises:
            ValueError: ``seconds`` is NaN.
        """
        if math.isnan(seconds):
            raise ValueError("cannot sleep for NaN seconds")
        if seconds <= 0:
            return asyncio.sleep(0)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            entry = (self._mono + seconds, next(self._seq), future)
            heapq.heappush(self._sleepers, entry)
            self._compact()
        return _wait(future)

    # ------------------------------------------------------------ inspection

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting (canceled ones are not counted)."""
        with self._lock:
            return sum(1 for _, _, f in self._sleepers if not f.done())

    def next_deadline(self) -> float | None:
        """Return the monotonic time the next sleeper wakes at, or None."""
        with self._lock:
            while self._sleepers and self._sleepers[0][2].done():
                heapq.heappop(self._sleepers)
            return self._sleepers[0][0] if self._sleepers else None

    # ------------------------------------------------------------ moving time

    def advance(self, seconds: float) -> None:
        """Move both clocks forward and wake, in deadline order, every sleeper due.

        Time moves to each sleeper's deadline before it is woken, so sleepers are
        released in the order their deadlines fall (ties: the order they began).
        They run once the event loop gets control back.

        Raises:
            ValueError: ``seconds`` is negative or not finite: the clock never goes
                backwards, and never to infinity.
        """
        _check_finite("advance", seconds)
        if seconds < 0:
            raise ValueError(
                f"a FakeClock cannot go backwards (advance({seconds!r})); "
                "use jump_wall() to move the wall clock alone"
            )
        with self._lock:
            target = self._mono + seconds
            while self._sleepers and self._sleepers[0][0] <= target:
                deadline, _, future = heapq.heappop(self._sleepers)
                if future.done():
                    continue
                self._step(max(0.0, deadline - self._mono))
                _wake(future)
            self._step(target - self._mono)

    def advance_to_next(self) -> float | None:
        """Advance to the next sleeper's deadline and wake it; return the step.

        Returns None (and moves nothing) when nobody sleeps.
        """
        deadline = self.next_deadline()
        if deadline is None:
            return None
        step = max(0.0, deadline - self._mono)
        self.advance(step)
        return step

    def jump_wall(self, seconds: float) -> None:
        """Move the wall clock alone (either way); durations are not affected.

        Raises:
            ValueError: ``seconds`` is not finite.
        """
        _check_finite("jump_wall", seconds)
        with self._lock:
            self._wall += timedelta(seconds=seconds)

    async def settle(self, iterations: int = 20) -> None:
        """Let woken tasks run for ``iterations`` event-loop iterations.

        Counts loop iterations, not real time. Work that waits on a thread (a
        database driver, ``asyncio.to_thread``) may need longer: wait for an event
        it sets instead.
        """
        for _ in range(iterations):
            await asyncio.sleep(0)

    async def advance_async(self, seconds: float, *, settle: int = 20) -> None:
        """Advance, then let woken tasks run for ``settle`` loop iterations."""
        self.advance(seconds)
        await self.settle(settle)

    # ------------------------------------------------------------ internals

    def _step(self, seconds: float) -> None:
        self._mono += seconds
        self._wall += timedelta(seconds=seconds)

    def _compact(self) -> None:
        """Drop canceled sleepers once they are most of the heap.

        A claim loop that is woken by a push before its poll sleep ends leaves a
        canceled sleeper behind; without this, a test that never advances would
        keep every one of them.
        """
        if len(self._sleepers) < 64:
            return
        live = [entry for entry in self._sleepers if not entry[2].done()]
        if len(live) * 2 < len(self._sleepers):
            heapq.heapify(live)
            self._sleepers = live


async def _wait(future: asyncio.Future[None]) -> None:
    try:
        await future
    finally:
        # A canceled sleep leaves the heap as soon as it is compacted or popped.
        future.cancel()


def _wake(future: asyncio.Future[None]) -> None:
    """Resolve a sleeper's future, from its loop's thread or another one."""
    loop = future.get_loop()
    if loop.is_closed():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        future.set_result(None)
    else:
        loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _check_finite(name: str, seconds: float) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"{name}() takes seconds as a number (got {seconds!r})")
    if not math.isfinite(seconds):
        raise ValueError(f"{name}() needs a finite number of seconds (got {seconds!r})")
