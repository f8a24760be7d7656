"""Graceful shutdown: running jobs go back to the queue with no attempt charged."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from backgrounder import Job, JobManager, JobStatus, TaskRegistry
from backgrounder.store.sqlite import SqliteStore
from backgrounder_testing import FakeClock
from tests.backgrounder.casekit import Probe, started
from tests.conftest import ManagerFactory, wait_for


async def test_shutdown_returns_a_running_job_uncharged(
    make_manager: ManagerFactory, clock: FakeClock, tmp_path: object
) -> None:
    """Past shutdown_grace_seconds the job is queued again as the same attempt."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    manager = await make_manager(registry, clock=clock, shutdown_grace_seconds=2)
    job = await manager.submit(
        "probe", {"name": "j", "block": True, "stage": "infer"}, max_retries=0
    )
    await started(probe, "j")

    closing = asyncio.create_task(manager.close())
    start = clock.monotonic()
    async with asyncio.timeout(10):
        while not closing.done():
            await clock.advance_async(0.1)
            await asyncio.sleep(0)
    await closing
    assert clock.monotonic() - start >= 2  # it waited out the grace first

    probe.gates["j"].set()
    again = await make_manager(registry, clock=clock)
    requeued = await again.get(job.id)
    assert requeued.attempt == 1
    assert requeued.errors == []
    done = await wait_for(again, job.id, "done")
    assert (done.attempt, done.retries, done.errors) == (1, 0, [])
    assert probe.runs["j"] == 2


async def test_shutdown_lets_a_job_finish_within_the_grace(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """A job that ends during the grace is recorded done, not re-queued."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    manager = await make_manager(registry, clock=clock, shutdown_grace_seconds=10)
    job = await manager.submit("probe", {"name": "j", "block": True})
    await started(probe, "j")

    closing = asyncio.create_task(manager.close())
    for _ in range(5):
        await asyncio.sleep(0)
    probe.gates["j"].set()
    async with asyncio.timeout(10):
        await closing

    reader = JobManager(db_path=manager.store.path, worker_count=0)  # type: ignore[attr-defined]
    async with reader:
        assert (await reader.get(job.id)).status == JobStatus.done


async def test_events_wait_on_the_manager_clock(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """events() re-reads the store on the manager's clock, not on real time."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    api = await make_manager(
        registry, clock=clock, worker_count=0, event_poll_seconds=3600
    )
    job = await api.submit("probe", {"name": "e"})
    stream = api.events(job.id)
    first = await anext(stream)
    assert first.job.status == JobStatus.queued
    nxt = asyncio.ensure_future(anext(stream))
    # Another process finishes the job: only a store re-read can see it.
    await api.store.update(job.id, {"status": JobStatus.canceled})
    await clock.advance_async(api.settings.event_poll_seconds)
    async with asyncio.timeout(10):
        event = await nxt
    assert event.job.status == JobStatus.canceled
    await stream.aclose()


class _SlowClaimWrite(SqliteStore):
    """A store whose queued -> running write returns only when the test says."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def update(self, job_id: str, fields: Any, **expect: Any) -> Job | None:
        job = await super().update(job_id, fields, **expect)
        if fields.get("status") == JobStatus.running:
            self.entered.set()
            await self.gate.wait()
        return job

    async def update_many(self, updates: Any) -> list[Job | None]:
        jobs = await super().update_many(updates)
        if any(u.fields.get("status") == JobStatus.running for u in updates):
            self.entered.set()
            await self.gate.wait()
        return jobs


async def test_shutdown_during_a_claim_returns_the_job_uncharged(
    tmp_path: Path,
) -> None:
    """A job claimed just as the worker stops is queued again as the same attempt."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    store = _SlowClaimWrite(tmp_path / "jobs.db")
    manager = JobManager(store=store, registry=registry)
    await manager.start()
    job = await manager.submit("probe", {"name": "j"}, max_retries=0)
    async with asyncio.timeout(10):
        await store.entered.wait()  # the job is running in the store, not launched

    await manager.close()

    async with JobManager(db_path=tmp_path / "jobs.db", registry=registry) as again:
        done = await wait_for(again, job.id, "done")
    assert (done.attempt, done.errors) == (1, [])
    assert probe.runs["j"] == 1
