"""Clocks: every read of time and every sleep in backgrounder goes through one."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """What backgrounder needs of time.

    ``now()`` is wall time, for timestamps users see and for leases shared between
    processes. ``monotonic()`` and ``sleep()`` measure durations (timeouts, backoff,
    heartbeats), so a wall-clock jump never fires or suppresses a timeout.
    """

    def now(self) -> datetime:
        """Return the current time, timezone-aware, in UTC."""
        ...

    def monotonic(self) -> float:
        """Return seconds on a clock that never goes backwards."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait for ``seconds`` of monotonic time."""
        ...


class SystemClock:
    """The real clock: ``datetime.now(UTC)``, ``time.monotonic``, ``asyncio.sleep``."""

    def now(self) -> datetime:
        """Return the current UTC time."""
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """Return ``time.monotonic()``."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Sleep on the event loop."""
        await asyncio.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "SystemClock()"
