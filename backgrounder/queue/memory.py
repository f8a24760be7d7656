"""The in-process priority queue, the embedded default; a built-in plugin."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Sequence

from backgrounder.clock import Clock, SystemClock
from backgrounder.hookspecs import hookimpl
from backgrounder.queue.base import JobQueue

__all__ = ["MemoryQueue"]

logger = logging.getLogger(__name__)


class MemoryQueue(JobQueue):
    """A priority queue in this process's memory, with delays and claim leases.

    Priority is strict (higher first, FIFO within a priority, no aging): a
    low-priority job waits as long as higher-priority jobs keep arriving.

    Only one process sees it, so it suits the embedded default: the store holds
    every queued job, and the manager refills the queue from the store at start-up.

    Invariant: an id is in at most one of ``_ready`` (by live entry), ``_delayed``
    and ``_claimed``; ``_entries`` maps each waiting id to its live heap entry, and
    heap entries no longer in ``_entries`` are stale and skipped when popped.
    """

    name = "memory"
    shared = False

    def __init__(self) -> None:
        self._clock: Clock = SystemClock()
        self._seq = itertools.count()
        self._ready: list[tuple[int, int, str]] = []
        self._delayed: list[tuple[float, int, str]] = []
        self._entries: dict[str, tuple[float, int, int]] = {}
        self._claimed: dict[str, tuple[float, int]] = {}
        self._wakeup = asyncio.Event()
        self._listeners: set[asyncio.Queue[str]] = set()

    def __repr__(self) -> str:
        return (
            f"MemoryQueue(waiting={len(self._entries)}, claimed={len(self._claimed)})"
        )

    async def open(self, clock: Clock) -> None:
        self._clock = clock

    async def close(self) -> None:
        self._wakeup.set()

    async def ping(self) -> None:
        return None

    async def push(
        self, job_id: str, *, priority: int, delay_seconds: float = 0.0
    ) -> None:
        if job_id in self._claimed:
            return
        entry = self._entries.get(job_id)
        if entry is not None and entry[:2] == (0.0, priority) and delay_seconds <= 0:
            # Ready at this priority already: keep its place, so a re-push (the
            # stale-job pass) never moves it behind jobs submitted after it. Any
            # other re-push takes the new priority and delay.
            return
        seq = next(self._seq)
        due = self._clock.monotonic() + delay_seconds if delay_seconds > 0 else 0.0
        self._entries[job_id] = (due, priority, seq)
        if due:
            heapq.heappush(self._delayed, (due, seq, job_id))
        else:
            heapq.heappush(self._ready, (-priority, seq, job_id))
        self._wakeup.set()

    def _promote_due(self) -> float | None:
        """Move due delayed ids to the ready heap; return the next due time."""
        now = self._clock.monotonic()
        while self._delayed:
            due, seq, job_id = self._delayed[0]
            entry = self._entries.get(job_id)
            if entry is None or entry[2] != seq:
                heapq.heappop(self._delayed)
                continue
            if due > now:
                return due
            heapq.heappop(self._delayed)
            self._entries[job_id] = (0.0, entry[1], seq)
            heapq.heappush(self._ready, (-entry[1], seq, job_id))
        return None

    def _pop_ready(self) -> tuple[str, int] | None:
        while self._ready:
            _, seq, job_id = heapq.heappop(self._ready)
            entry = self._entries.get(job_id)
            if entry is not None and entry[2] == seq and entry[0] == 0.0:
                del self._entries[job_id]
                return job_id, entry[1]
        return None

    def claim_nowait(self, *, lease_seconds: float) -> str | None:
        """Take the next claimable id without waiting, or return None."""
        self._promote_due()
        popped = self._pop_ready()
        if popped is None:
            return None
        job_id, priority = popped
        self._claimed[job_id] = (self._clock.monotonic() + lease_seconds, priority)
        return job_id

    async def claim(
        self, *, worker_id: str, lease_seconds: float, timeout_seconds: float
    ) -> str | None:
        deadline = self._clock.monotonic() + timeout_seconds
        while True:
            job_id = self.claim_nowait(lease_seconds=lease_seconds)
            if job_id is not None:
                return job_id
            now = self._clock.monotonic()
            if now >= deadline:
                return None
            next_due = self._promote_due()
            wait_until = deadline if next_due is None else min(deadline, next_due)
            self._wakeup.clear()
            await self._wait(wait_until - now)

    async def claim_many(
        self,
        *,
        worker_id: str,
        lease_seconds: float,
        timeout_seconds: float,
        limit: int,
    ) -> list[str]:
        first = await self.claim(
            worker_id=worker_id,
            lease_seconds=lease_seconds,
            timeout_seconds=timeout_seconds,
        )
        if first is None:
            return []
        ids = [first]
        while len(ids) < limit:
            more = self.claim_nowait(lease_seconds=lease_seconds)
            if more is None:
                break
            ids.append(more)
        return ids

    async def ack_many(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            self._claimed.pop(job_id, None)

    async def _wait(self, seconds: float) -> None:
        """Wait for a push or for ``seconds`` on the clock, whichever comes first."""
        waiter = asyncio.ensure_future(self._wakeup.wait())
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()

    async def ack(self, job_id: str) -> None:
        self._claimed.pop(job_id, None)

    async def remove(self, job_id: str) -> bool:
        return self._entries.pop(job_id, None) is not None

    async def recover_expired(self) -> int:
        now = self._clock.monotonic()
        expired = [j for j, (deadline, _) in self._claimed.items() if deadline < now]
        for job_id in expired:
            _, priority = self._claimed.pop(job_id)
            logger.warning(
                "job %s: claim lease ran out before the job started; queued again",
                job_id,
                extra={"job_id": job_id, "event": "queue.claim_expired"},
            )
            await self.push(job_id, priority=priority)
        return len(expired)

    async def size(self) -> int:
        return len(self._entries)

    async def publish_cancel(self, job_id: str) -> None:
        for listener in self._listeners:
            listener.put_nowait(job_id)

    def cancellations(self) -> _Cancellations:
        return _Cancellations(self)


class _Cancellations:
    """An async iterator over published cancels, registered while it lives."""

    def __init__(self, queue: MemoryQueue) -> None:
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._owner = queue
        queue._listeners.add(self._queue)

    def __aiter__(self) -> _Cancellations:
        return self

    async def __anext__(self) -> str:
        return await self._queue.get()

    async def aclose(self) -> None:
        self._owner._listeners.discard(self._queue)


@hookimpl
def backgrounder_create_queue(url: str) -> JobQueue | None:
    """Build a MemoryQueue for ``memory://``."""
    if not url.startswith("memory:"):
        return None
    return MemoryQueue()
