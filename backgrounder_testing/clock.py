"""FakeClock: time that moves only when a test says so."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from datetime import UTC, datetime, timedelta

__all__ = ["FakeClock"]


class FakeClock:
    """A Clock whose time moves only on ``advance()``.

    ``now()`` is wall time (aware UTC) and ``monotonic()`` measures durations; both
    move together on ``advance()``, and ``jump_wall()`` moves the wall time alone,
    as NTP or an operator might. ``await sleep(s)`` waits until ``advance`` has
    moved monotonic time past its deadline.
    """

    def __init__(self, start: datetime | None = None) -> None:
        """Start at ``start`` (aware; default 2026-01-01 UTC) and monotonic 0."""
        if start is not None and start.tzinfo is None:
            raise ValueError(f"start must be timezone-aware (got {start!r})")
        self._wall = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._mono = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def __repr__(self) -> str:
        return f"FakeClock(now={self._wall.isoformat()}, monotonic={self._mono})"

    def now(self) -> datetime:
        """Return the fake wall time."""
        return self._wall

    def monotonic(self) -> float:
        """Return the fake monotonic time in seconds."""
        return self._mono

    async def sleep(self, seconds: float) -> None:
        """Wait until the clock has been advanced by ``seconds``."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._seq), future))
        await future

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def next_deadline(self) -> float | None:
        """Return the monotonic time the next sleeper wakes at, or None."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else None

    def advance(self, seconds: float) -> None:
        """Move both clocks forward and wake, in deadline order, every sleeper due.

        Raises:
            ValueError: ``seconds`` is negative: the clock never goes backwards.
        """
        if seconds < 0:
            raise ValueError(f"a FakeClock cannot go backwards (advance({seconds!r}))")
        target = self._mono + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            if future.done():
                continue
            step = max(0.0, deadline - self._mono)
            self._mono += step
            self._wall += timedelta(seconds=step)
            future.set_result(None)
        step = target - self._mono
        self._mono = target
        self._wall += timedelta(seconds=step)

    def jump_wall(self, seconds: float) -> None:
        """Move the wall clock alone (either way); durations are not affected."""
        self._wall += timedelta(seconds=seconds)

    async def advance_async(self, seconds: float, *, settle: int = 20) -> None:
        """Advance, then let woken tasks run for ``settle`` loop iterations."""
        self.advance(seconds)
        for _ in range(settle):
            await asyncio.sleep(0)
