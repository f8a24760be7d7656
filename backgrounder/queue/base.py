"""The JobQueue contract: which job runs next, and when it may run."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence

from backgrounder.clock import Clock

__all__ = ["JobQueue"]


class JobQueue(abc.ABC):
    """Job ids waiting to run, by priority (higher first) then FIFO.

    The store is the truth about a job; the queue only orders ids. A claim takes an
    id out for ``lease_seconds``: the worker acks it once the store shows the job
    running, and an id claimed but never acked returns by itself when the claim's
    lease runs out, so a crash between claim and start loses nothing.
    """

    #: A short name for messages and health reports ("memory", "redis").
    name: str = "queue"

    #: Whether workers of other processes take jobs from it too. False for a
    #: queue in this process's memory: only this process's workers run its jobs.
    shared: bool = True

    @abc.abstractmethod
    async def open(self, clock: Clock) -> None:
        """Connect; raise QueueError naming the cause if the queue is unreachable."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Safe to call twice."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Check the queue answers; raise QueueError if not."""

    @abc.abstractmethod
    async def push(
        self, job_id: str, *, priority: int, delay_seconds: float = 0.0
    ) -> None:
        """Make ``job_id`` claimable after ``delay_seconds``.

        Idempotent: an id already waiting or claimed is not added twice (a waiting
        one takes the new priority and delay).
        """

    @abc.abstractmethod
    async def claim(
        self, *, worker_id: str, lease_seconds: float, timeout_seconds: float
    ) -> str | None:
        """Take the next claimable id, waiting up to ``timeout_seconds``.

        Returns:
            The job id, or None when nothing became claimable in time.
        """

    async def claim_many(
        self,
        *,
        worker_id: str,
        lease_seconds: float,
        timeout_seconds: float,
        limit: int,
    ) -> list[str]:
        """Take up to ``limit`` claimable ids, waiting up to ``timeout_seconds``
        for the first; the rest are only those claimable at once.

        Each id is claimed as by ``claim``, with its own lease. The default calls
        ``claim``; queues override it with one round trip.
        """
        first = await self.claim(
            worker_id=worker_id,
            lease_seconds=lease_seconds,
            timeout_seconds=timeout_seconds,
        )
        if first is None:
            return []
        ids = [first]
        while len(ids) < limit:
            more = await self.claim(
                worker_id=worker_id, lease_seconds=lease_seconds, timeout_seconds=0.0
            )
            if more is None:
                break
            ids.append(more)
        return ids

    @abc.abstractmethod
    async def ack(self, job_id: str) -> None:
        """Drop a claimed id for good (the store now owns the job's fate)."""

    async def ack_many(self, job_ids: Sequence[str]) -> None:
        """Ack each id; the default calls ``ack`` for each."""
        for job_id in job_ids:
            await self.ack(job_id)

    @abc.abstractmethod
    async def remove(self, job_id: str) -> bool:
        """Drop a waiting id (a canceled queued job). Return True if it was there."""

    @abc.abstractmethod
    async def recover_expired(self) -> int:
        """Return claimed ids whose claim lease ran out; return how many."""

    @abc.abstractmethod
    async def size(self) -> int:
        """Return how many ids wait (delayed ones included, claimed ones not)."""

    async def publish_cancel(self, job_id: str) -> None:
        """Tell every worker listening that ``job_id`` should stop.

        The default does nothing: workers then learn of the cancel from the store at
        their next heartbeat. Queues shared between processes override it.
        """
        return None

    def cancellations(self) -> AsyncIterator[str] | None:
        """Return an async iterator of job ids whose cancel was published, or None."""
        return None
