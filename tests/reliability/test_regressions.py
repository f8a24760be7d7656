"""Bugs the reliability suites found, each pinned by the smallest example."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from backgrounder import (
    Job,
    JobManager,
    JobStatus,
    NoopRunner,
    RunContext,
    Stage,
    TaskRegistry,
)
from backgrounder.models import ErrorCode, ErrorInfo, ResourceRequest
from backgrounder.resources import ResourceManager
from backgrounder.store.base import Update
from backgrounder.store.sqlite import SqliteStore
from backgrounder_testing import FakeClock
from tests.conftest import ManagerFactory, wait_for


def test_two_attempts_of_one_job_hold_two_reservations() -> None:
    """Releasing an old attempt's reservation keeps the new attempt's counted.

    A sync runner keeps its slot after its attempt timed out, while the retry of
    the same job starts in the same process: both hold memory until each ends.
    """
    resources = ResourceManager(None, [])
    old = resources.try_reserve("job-1", ResourceRequest(memory_mb=100))
    new = resources.try_reserve("job-1", ResourceRequest(memory_mb=100))
    assert old is not None and new is not None
    assert resources.running_jobs == 2
    assert resources.reserved_memory_mb() == 200

    resources.release(old)

    assert resources.running_jobs == 1
    assert resources.reserved_memory_mb() == 100
    resources.release(new)
    resources.release(new)
    assert resources.running_jobs == 0


async def test_accepted_cancel_is_not_undone_by_a_lost_worker(tmp_path: Path) -> None:
    """A running job whose cancel was accepted ends canceled when its worker dies.

    Before, lease recovery queued it again as a retry and cleared the request, so
    a job the API had agreed to cancel ran again (and could end done).
    """
    clock = FakeClock()
    registry = TaskRegistry()
    registry.add("work", NoopRunner(sleep_ms=0))
    async with JobManager(
        db_path=tmp_path / "jobs.db",
        registry=registry,
        clock=clock,
        worker_count=0,
        lease_seconds=30,
    ) as manager:
        job = await manager.submit("work", max_retries=1)
        claimed = await manager.queue.claim(
            worker_id="w1", lease_seconds=30, timeout_seconds=0
        )
        assert claimed == job.id
        running = await manager.store.update(
            job.id,
            {
                "status": JobStatus.running,
                "worker_id": "w1",
                "lease_expires_at": clock.now() + timedelta(seconds=30),
            },
            expect_status={JobStatus.queued},
        )
        await manager.queue.ack(job.id)
        assert running is not None

        accepted = await manager.cancel(job.id)
        assert accepted.cancel_requested
        clock.advance(31)
        assert await manager.recover_expired() == 1

        after = await manager.get(job.id)
        assert after.status == JobStatus.canceled
        assert after.attempt == 1
        assert after.error is not None and after.error.code == ErrorCode.canceled
        assert "worker_lost" in after.error.message
        assert await manager.queue.size() == 0


@pytest.mark.all_backends
async def test_b15_cancel_accepted_after_runner_returned_never_ends_done(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job whose cancel was answered with a running job never ends done.

    The cancel is made just before the worker's done write reaches the store
    (every store write the done outcome can take is wrapped: ``update``,
    ``apply`` and ``update_many``), on every store/queue pair.
    """
    registry = TaskRegistry()
    registry.add("quick", NoopRunner(sleep_ms=0, stages=1))
    manager = await make_manager(registry, worker_count=1)
    answers: list[Job] = []
    store = manager.store
    write, apply, write_many = store.update, store.apply, store.update_many

    async def before(job_id: str, fields: Mapping[str, Any]) -> None:
        if fields.get("status") == JobStatus.done and not answers:
            answers.append(await manager.cancel(job_id))

    async def update(job_id: str, fields: Mapping[str, Any], **expect: Any) -> Any:
        await before(job_id, fields)
        return await write(job_id, fields, **expect)

    async def apply_one(update: Update) -> bool:
        await before(update.job_id, update.fields)
        return await apply(update)

    async def update_many(updates: Sequence[Update]) -> list[Job | None]:
        for one in updates:
            await before(one.job_id, one.fields)
        return await write_many(updates)

    monkeypatch.setattr(store, "update", update)
    monkeypatch.setattr(store, "apply", apply_one)
    monkeypatch.setattr(store, "update_many", update_many)
    job = await manager.submit("quick")
    final = await wait_for(manager, job.id)

    assert answers and answers[0].cancel_requested
    assert answers[0].status == JobStatus.running
    assert final.status == JobStatus.canceled


class _SlowFindQueued(SqliteStore):
    """A SQLite store whose ``find_queued`` read takes ``read_seconds`` on a clock."""

    clock: FakeClock | None = None
    read_seconds = 0.0

    async def find_queued(
        self, *, updated_before: Any = None, limit: int = 1000
    ) -> list[Job]:
        jobs = await super().find_queued(updated_before=updated_before, limit=limit)
        if self.clock is not None:
            self.clock.advance(self.read_seconds)
        return jobs


async def test_requeue_of_a_delayed_retry_keeps_its_run_after(tmp_path: Path) -> None:
    """A queued retry pushed again after a slow store read is due at its run_after.

    The re-push measured the delay from a "now" taken before the read, so time
    spent in the read was added to the delay: a FakeClock test that advanced to
    just past run_after while the maintenance pass read the store saw its retry
    never run.
    """
    clock = FakeClock()
    store = _SlowFindQueued(tmp_path / "jobs.db")
    registry = TaskRegistry()
    registry.add("work", NoopRunner(sleep_ms=0))
    async with JobManager(
        store=store,
        registry=registry,
        clock=clock,
        worker_count=0,
        retry_backoff_seconds=100,
    ) as manager:
        job = await manager.submit("work", max_retries=1)
        assert await manager.queue.claim(
            worker_id="w1", lease_seconds=30, timeout_seconds=0
        )
        running = await manager.store.update(
            job.id,
            {"status": JobStatus.running, "worker_id": "w1"},
            expect_status={JobStatus.queued},
        )
        await manager.queue.ack(job.id)
        assert running is not None
        retry = await manager.finish_attempt(
            running,
            error=ErrorInfo(
                code=ErrorCode.execution_error,
                type="RuntimeError",
                message="upstream answered 503",
                retryable=True,
            ),
            worker_id="w1",
            progress=running.progress,
        )
        assert retry is not None and retry.run_after is not None
        due_in = (retry.run_after - clock.now()).total_seconds()
        assert due_in >= 40

        store.clock, store.read_seconds = clock, 30
        assert await manager.restore_queue() == 1
        store.clock = None
        clock.advance(due_in - 30 - 0.5)
        assert (
            await manager.queue.claim(
                worker_id="w2", lease_seconds=30, timeout_seconds=0
            )
            is None
        )
        clock.advance(1)
        claimed = await manager.queue.claim(
            worker_id="w2", lease_seconds=30, timeout_seconds=0
        )
        assert claimed == job.id


class _ReportsThenWaits:
    """Report 20 % then 40 %, then wait for the test before returning."""

    def __init__(self) -> None:
        self.reported = asyncio.Event()
        self.gate = asyncio.Event()

    async def execute(self, job: Job, ctx: RunContext) -> None:
        await ctx.progress(20, Stage.infer, 1, 5)
        await ctx.progress(40, Stage.infer, 2, 5)
        self.reported.set()
        await self.gate.wait()


@pytest.mark.all_backends
async def test_b38_progress_read_while_the_attempt_ends_never_goes_down(
    make_manager: ManagerFactory, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that the store answers "running" just after the attempt ended here
    still shows the attempt's latest progress, not the older stored one.

    Progress writes are coalesced, so the store lags; the live progress used to
    be looked up only after the read, when the attempt was already gone, and a
    poller saw 40 %, then 20 % (found by the B38 poll test on the real server).
    """
    runner = _ReportsThenWaits()
    registry = TaskRegistry()
    registry.add("steps", runner)
    manager = await make_manager(
        registry, clock=clock, worker_count=1, progress_interval_seconds=3600
    )
    job = await manager.submit("steps")
    async with asyncio.timeout(10):
        await runner.reported.wait()
    assert (await manager.get(job.id)).progress.percent == 40
    assert manager.worker is not None
    worker = manager.worker
    read = manager.store.get

    async def read_then_finish(job_id: str) -> Job | None:
        stale = await read(job_id)
        runner.gate.set()
        async with asyncio.timeout(10):
            while job_id in worker.running:
                await asyncio.sleep(0)
        return stale

    monkeypatch.setattr(manager.store, "get", read_then_finish)
    seen = await manager.get(job.id)

    assert seen.status == JobStatus.running
    assert seen.progress.percent == 40
    monkeypatch.undo()
    done = await wait_for(manager, job.id)
    assert (done.status, done.progress.percent) == (JobStatus.done, 40)
