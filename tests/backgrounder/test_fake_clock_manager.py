"""Timeouts, retry backoff and lease recovery driven by bg_clock, not by waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from backgrounder import Job, JobManager, RunContext, Stage, TaskRegistry
from backgrounder.models import ErrorCode, JobStatus
from backgrounder_testing import FakeClock
from tests.conftest import wait_for

ManagerFactory = Callable[..., Any]


class SleepsOnFirstAttempt:
    """Report progress, then sleep two hours on the job's clock (first attempt)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.attempts: list[int] = []

    async def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        self.attempts.append(job.attempt)
        await ctx.progress(5, Stage.infer, message="model loaded")
        self.started.set()
        if job.attempt == 1:
            await ctx.sleep(2 * 3600)
        return {"attempt": job.attempt}


class FailsOnce:
    """Fail the first attempt, succeed on the next."""

    def __init__(self) -> None:
        self.attempts: list[int] = []

    async def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        self.attempts.append(job.attempt)
        if job.attempt == 1:
            raise RuntimeError("upstream answered 503")
        return {"attempt": job.attempt}


async def _until(manager: JobManager, job_id: str, check: Callable[[Job], bool]) -> Job:
    """Follow the job's events until ``check`` holds (guarded, never a sleep)."""
    async with asyncio.timeout(10):
        async for event in manager.events(job_id):
            if check(event.job):
                return event.job
    raise AssertionError(f"job {job_id} ended before the condition held")


async def test_fake_clock_timeout_ends_two_hour_sleep_with_timeout(
    bg_manager: JobManager, bg_clock: FakeClock
) -> None:
    """A one-hour timeout ends a two-hour sleep at 3601 s with code timeout."""
    runner = SleepsOnFirstAttempt()
    bg_manager.registry.add("sleepy", runner)
    job = await bg_manager.submit("sleepy", timeout_seconds=3600)
    async with asyncio.timeout(10):
        await runner.started.wait()
    await bg_clock.settle()

    bg_clock.advance(3599)
    await bg_clock.settle()
    assert (await bg_manager.get(job.id)).status == JobStatus.running

    bg_clock.advance(2)
    failed = await wait_for(bg_manager, job.id, "failed")

    assert failed.error is not None
    assert failed.error.code == ErrorCode.timeout
    assert failed.error.stage == Stage.infer
    assert "timeout_seconds=3600" in failed.error.message


@pytest.mark.parametrize("jump", [3600, -3600], ids=["plus-1h", "minus-1h"])
async def test_b43_fake_clock_wall_jump_neither_fires_nor_suppresses_timeout(
    bg_manager: JobManager, bg_clock: FakeClock, jump: float
) -> None:
    """A wall-clock jump of an hour at t=2 s leaves a 10 s timeout at 10 s."""
    runner = SleepsOnFirstAttempt()
    bg_manager.registry.add("sleepy", runner)
    job = await bg_manager.submit("sleepy", timeout_seconds=10)
    async with asyncio.timeout(10):
        await runner.started.wait()
    await bg_clock.settle()

    bg_clock.advance(2)
    bg_clock.jump_wall(jump)
    await bg_clock.settle()
    bg_clock.advance(7)
    await bg_clock.settle()
    assert (await bg_manager.get(job.id)).status == JobStatus.running

    bg_clock.advance(1.5)
    failed = await wait_for(bg_manager, job.id, "failed")
    assert failed.error is not None and failed.error.code == ErrorCode.timeout


@pytest.mark.backgrounder(retry_backoff_seconds=120)
async def test_fake_clock_retry_runs_right_after_backoff(
    bg_manager: JobManager, bg_clock: FakeClock
) -> None:
    """A failed attempt with a 120 s backoff runs again just after the delay."""
    runner = FailsOnce()
    bg_manager.registry.add("flaky", runner, max_retries=1)
    job = await bg_manager.submit("flaky")

    queued = await _until(
        bg_manager, job.id, lambda j: j.attempt == 2 and j.status == "queued"
    )
    assert queued.run_after is not None
    delay = (queued.run_after - bg_clock.now()).total_seconds()
    assert 60 <= delay <= 120

    bg_clock.advance(delay - 1)
    await bg_clock.settle()
    assert (await bg_manager.get(job.id)).status == JobStatus.queued
    assert runner.attempts == [1]

    bg_clock.advance(1.5)
    done = await wait_for(bg_manager, job.id, "done")
    assert runner.attempts == [1, 2]
    assert [e.code for e in done.errors] == [ErrorCode.execution_error]
    assert await bg_manager.assets(job.id) == done.assets


@pytest.mark.backgrounder(lease_seconds=30)
async def test_fake_clock_expired_lease_is_recovered_by_another_process(
    bg_manager_factory: ManagerFactory,
    bg_clock: FakeClock,
    bg_registry: TaskRegistry,
) -> None:
    """A job whose worker died is recovered as worker_lost and run again."""
    runner = SleepsOnFirstAttempt()
    bg_registry.add("sleepy", runner, max_retries=1)
    crashed = await bg_manager_factory(worker_count=1)
    job = await crashed.submit("sleepy")
    async with asyncio.timeout(10):
        await runner.started.wait()
    crashed.worker.abandon()
    await crashed.close(drain=False)
    survivor = await bg_manager_factory(worker_count=1)
    assert (await survivor.get(job.id)).status == JobStatus.running

    bg_clock.advance(31)
    requeued = await _until(survivor, job.id, lambda j: j.attempt == 2)
    assert requeued.errors[0].code == ErrorCode.worker_lost

    bg_clock.advance(2)
    done = await wait_for(survivor, job.id, "done")
    assert runner.attempts == [1, 2]
    assert done.worker_id is None or done.worker_id == survivor.worker.worker_id


async def test_fake_clock_own_live_job_is_never_recovered(
    bg_manager: JobManager, bg_clock: FakeClock
) -> None:
    """A jump far past the lease leaves a live job to its own worker."""
    runner = SleepsOnFirstAttempt()
    bg_manager.registry.add("sleepy", runner)
    job = await bg_manager.submit("sleepy", timeout_seconds=None)
    async with asyncio.timeout(10):
        await runner.started.wait()
    await bg_clock.settle()

    bg_clock.advance(600)
    await bg_manager.recover_expired()

    current = await bg_manager.get(job.id)
    assert current.status == JobStatus.running
    assert current.attempt == 1 and not current.errors


class TightReporter:
    """Waits for a listener, then reports progress in a tight loop over stages."""

    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def execute(self, job: Job, ctx: RunContext) -> None:
        await self.go.wait()
        for stage in (Stage.fetch, Stage.infer):
            for i in range(1, 1001):
                await ctx.progress(i / 10, stage, i, 1000)


async def test_a_burst_of_progress_reaches_listeners_coalesced_and_in_full(
    bg_manager: JobManager, bg_clock: FakeClock
) -> None:
    """2,000 reports with no time passing reach a listener as one event per new
    stage and the last report, which comes before the job's ending; the store
    and the final state hold the last report."""
    runner = TightReporter()
    bg_manager.registry.add("tight", runner)
    job = await bg_manager.submit("tight")
    await wait_for(bg_manager, job.id, "running")
    events = []
    async with asyncio.timeout(10):
        async for event in bg_manager.events(job.id):
            events.append(event)
            if not runner.go.is_set():
                runner.go.set()
    progress = [
        (e.job.progress.stage, e.job.progress.processed)
        for e in events
        if e.kind == "progress"
    ]
    assert progress == [(Stage.fetch, 1), (Stage.infer, 1), (Stage.infer, 1000)]
    assert events[-1].kind == "status" and events[-1].job.status == JobStatus.done
    assert events[-1].job.progress.processed == 1000
    assert (await bg_manager.get(job.id)).progress.stage == Stage.infer
