"""Found: an ended attempt's clean-up forgot the next attempt of the same job.

A retried job can start again in the same worker (another free slot) while the
attempt that failed is still finishing its bookkeeping: here an ``async``
``backgrounder_job_event`` hook (the hookspec allows it) is awaited when the
retry is queued. The old attempt's ``finally`` then removed the job id from
``worker.running`` although the id now belonged to the new attempt: its lease
was no longer renewed (so recovery would run it a second time while it still
runs) and a cancel request could not reach it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from backgrounder import Job, JobManager, JobStatus, RunContext, TaskRegistry, hookimpl
from backgrounder.models import JobEvent
from tests.conftest import wait_for


class _FailOnceThenWait:
    def __init__(self) -> None:
        self.second_started = asyncio.Event()
        self.let_go = asyncio.Event()

    async def execute(self, job: Job, ctx: RunContext) -> None:
        if job.attempt == 1:
            raise RuntimeError("first attempt fails")
        self.second_started.set()
        # Ends on a cancel, or when the test lets it go (so close() returns
        # even when the cancel never reaches it).
        stop = asyncio.ensure_future(self.let_go.wait())
        try:
            while not stop.done():
                await ctx.check_canceled()
                await asyncio.wait({stop}, timeout=0.05)
        finally:
            stop.cancel()


class _SlowRetryHook:
    """Holds the failed attempt's emit of the queued retry until attempt 2 runs."""

    def __init__(self) -> None:
        self.retry_running = asyncio.Event()
        self.old_task: asyncio.Task[object] | None = None

    @hookimpl
    async def backgrounder_job_event(self, event: JobEvent) -> None:
        job = event.job
        if job.attempt != 2:
            return
        if job.status == JobStatus.running:
            self.retry_running.set()
        elif job.status == JobStatus.queued and self.old_task is None:
            self.old_task = asyncio.current_task()
            await self.retry_running.wait()


async def test_retry_started_in_same_worker_stays_tracked(tmp_path: Path) -> None:
    runner = _FailOnceThenWait()
    hook = _SlowRetryHook()
    registry = TaskRegistry()
    registry.add("flaky", runner, max_retries=1)
    async with JobManager(
        db_path=tmp_path / "jobs.db",
        registry=registry,
        plugins=[hook],
        worker_count=2,
        retry_backoff_seconds=0,
        cancel_grace_seconds=0.5,
    ) as manager:
        job = await manager.submit("flaky")
        async with asyncio.timeout(10):
            await runner.second_started.wait()
            assert hook.old_task is not None
            # The failed attempt's task ends once its hook call returns.
            await asyncio.gather(hook.old_task, return_exceptions=True)

        tracked = manager.worker.live_job_ids()
        await manager.cancel(job.id)
        try:
            ended = await wait_for(manager, job.id, timeout=3)
        finally:
            runner.let_go.set()
        assert tracked == {job.id}
        assert ended.status == JobStatus.canceled
        assert ended.attempt == 2
