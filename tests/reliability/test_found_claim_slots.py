"""Found: a claim batch that failed after launching jobs gave their slots back.

``_claim_batch`` launches the jobs it started, then acks their claims. When the
ack (or the deferral of a job that does not fit, or the re-read of stale
snapshots) raised a BackendError, the claimer counted none of the batch as
started and freed every slot it had taken, although the launched jobs held
them and free them again when they end. The worker then ran more than
``concurrency`` jobs at once, for good.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backgrounder import Job, JobManager, JobStatus, RunContext, TaskRegistry
from backgrounder.errors import QueueError
from backgrounder.queue.memory import MemoryQueue
from backgrounder_testing import FakeClock


class _AckFailsOnce(MemoryQueue):
    def __init__(self) -> None:
        super().__init__()
        self.ack_failed = asyncio.Event()
        self.claim_calls = 0

    async def claim_many(self, **claim: Any) -> list[str]:
        self.claim_calls += 1
        return await super().claim_many(**claim)

    async def ack_many(self, job_ids: Sequence[str]) -> None:
        if not self.ack_failed.is_set():
            self.ack_failed.set()
            raise QueueError("connection reset while acking")
        await super().ack_many(job_ids)


class _Blocking:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.first_started = asyncio.Event()
        self.go = asyncio.Event()

    async def execute(self, job: Job, ctx: RunContext) -> None:
        self.started.append(job.id)
        self.first_started.set()
        await self.go.wait()


async def test_failed_ack_does_not_free_running_jobs_slots(tmp_path: Path) -> None:
    clock = FakeClock()
    queue = _AckFailsOnce()
    runner = _Blocking()
    registry = TaskRegistry()
    registry.add("block", runner, timeout_seconds=None)
    async with JobManager(
        db_path=tmp_path / "jobs.db",
        queue=queue,
        registry=registry,
        clock=clock,
        worker_count=1,
    ) as manager:
        first = await manager.submit("block", priority=90)
        second = await manager.submit("block", priority=10)
        async with asyncio.timeout(10):
            await runner.first_started.wait()
            await queue.ack_failed.wait()
        calls = queue.claim_calls
        try:
            # The claimer backs off on the clock after the failed ack; let it on.
            await clock.advance_async(5, settle=50)
            started = list(runner.started)
            claimed_again = queue.claim_calls != calls
            running = manager.worker.status()["running"]
            second_status = (await manager.get(second.id)).status
        finally:
            runner.go.set()
        assert started == [first.id]
        assert not claimed_again, "claimed again while the only slot runs"
        assert running == 1
        assert second_status == JobStatus.queued
