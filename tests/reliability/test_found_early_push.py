"""Found: a retry pushed before its claim was acked was dropped by the queue.

A claim batch launches the jobs it could start, and acks the batch's claims
only after re-reading stale snapshots (a job submitted here, then canceled and
retried before it was claimed) and failing jobs of unknown tasks. A launched
job that failed meanwhile queued its retry while its own claim was still
unacknowledged; both queues ignore a push of a claimed id, so the ack that
followed left the job ``queued`` in the store and on no queue, until the
stale-job pass pushed it a lease period later (instead of after its backoff).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backgrounder import Job, JobManager, JobStatus, RunContext, TaskRegistry
from backgrounder.models import Job as JobModel
from backgrounder.queue.memory import MemoryQueue
from backgrounder.store.sqlite import SqliteStore
from tests.conftest import wait_for


class _GatedQueue(MemoryQueue):
    """Claims wait for ``gate``; notes when a watched id is pushed again."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.watched: str | None = None
        self.watched_pushed = asyncio.Event()

    async def claim_many(self, **claim: Any) -> list[str]:
        await self.gate.wait()
        return await super().claim_many(**claim)

    async def push(
        self, job_id: str, *, priority: int, delay_seconds: float = 0.0
    ) -> None:
        await super().push(job_id, priority=priority, delay_seconds=delay_seconds)
        if job_id == self.watched:
            self.watched_pushed.set()


class _SlowReread(SqliteStore):
    """The worker's re-read of stale snapshots waits for the watched push."""

    def __init__(self, path: Path, queue: _GatedQueue) -> None:
        super().__init__(path)
        self.queue = queue

    async def get_many(self, job_ids: Sequence[str]) -> list[JobModel | None]:
        if self.queue.watched is not None and self.queue.gate.is_set():
            await self.queue.watched_pushed.wait()
        return await super().get_many(job_ids)


class _Fails:
    async def execute(self, job: Job, ctx: RunContext) -> None:
        raise RuntimeError("boom")


class _Noop:
    async def execute(self, job: Job, ctx: RunContext) -> None:
        return None


async def test_retry_of_a_job_launched_in_a_batch_is_not_dropped(
    tmp_path: Path,
) -> None:
    queue = _GatedQueue()
    store = _SlowReread(tmp_path / "jobs.db", queue)
    registry = TaskRegistry()
    registry.add("fails", _Fails(), max_retries=1)
    registry.add("noop", _Noop())
    async with JobManager(
        store=store,
        queue=queue,
        registry=registry,
        worker_count=2,
        retry_backoff_seconds=0,
        lease_seconds=60,
    ) as manager:
        # A snapshot that will be stale when claimed: canceled and retried.
        stale = await manager.submit("noop", priority=90)
        await manager.cancel(stale.id)
        await manager.retry(stale.id)
        failing = await manager.submit("fails", priority=10)
        queue.watched = failing.id
        queue.gate.set()

        ended = await wait_for(manager, failing.id, "failed", timeout=10)
        assert ended.attempt == 2
        assert (await wait_for(manager, stale.id, "done")).status == JobStatus.done
