"""Graceful shutdown: running jobs go back to the queue with no attempt charged.

Case B35; the tests marked ``all_backends`` run on every store/queue pair.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from backgrounder import Job, JobManager, JobStatus, NoopRunner, TaskRegistry
from backgrounder.errors import StoreError
from backgrounder_testing import FakeClock
from tests.backgrounder.casekit import Probe, started
from tests.conftest import ManagerFactory, wait_for


@pytest.mark.all_backends
async def test_b35_shutdown_returns_a_running_job_uncharged(
    make_manager: ManagerFactory, clock: FakeClock
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


@pytest.mark.all_backends
async def test_b35_shutdown_lets_a_job_finish_within_the_grace(
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

    reader = await make_manager(registry, worker_count=0)
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


@pytest.mark.all_backends
async def test_b35_shutdown_during_a_claim_returns_the_job_uncharged(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job claimed just as the worker stops is queued again as the same attempt.

    The store's queued -> running write is held (wrapped) until the manager
    closed, so the job is running in the store but was never launched.
    """
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    manager = await make_manager(registry)
    store = manager.store
    entered, gate = asyncio.Event(), asyncio.Event()
    update, update_many = store.update, store.update_many

    async def held_update(job_id: str, fields: Any, **expect: Any) -> Job | None:
        job = await update(job_id, fields, **expect)
        if fields.get("status") == JobStatus.running:
            entered.set()
            await gate.wait()
        return job

    async def held_update_many(updates: Any) -> list[Job | None]:
        jobs = await update_many(updates)
        if any(u.fields.get("status") == JobStatus.running for u in updates):
            entered.set()
            await gate.wait()
        return jobs

    monkeypatch.setattr(store, "update", held_update)
    monkeypatch.setattr(store, "update_many", held_update_many)
    job = await manager.submit("probe", {"name": "j"}, max_retries=0)
    async with asyncio.timeout(10):
        await entered.wait()  # the job is running in the store, not launched

    await manager.close()

    again = await make_manager(registry)
    done = await wait_for(again, job.id, "done")
    assert (done.attempt, done.errors) == (1, [])
    assert probe.runs["j"] == 1


@pytest.mark.all_backends
async def test_shutdown_before_a_claimed_job_is_started_queues_it_at_once(
    make_manager: ManagerFactory, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped between the claim and the queued -> running write, the worker
    hands the id back at once: nothing waits for the claim lease (the fake
    clock never lets it run out), and the job runs once, on the next worker."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    manager = await make_manager(registry, clock=clock)
    store = manager.store
    entered = asyncio.Event()
    update_many = store.update_many

    async def held_update_many(updates: Any) -> list[Job | None]:
        if any(u.fields.get("status") == JobStatus.running for u in updates):
            entered.set()
            await asyncio.Event().wait()  # until the worker is stopped
        return await update_many(updates)

    monkeypatch.setattr(store, "update_many", held_update_many)
    job = await manager.submit("probe", {"name": "j"}, max_retries=0)
    async with asyncio.timeout(10):
        await entered.wait()  # claimed, still queued in the store

    await manager.close()

    again = await make_manager(registry, clock=clock)
    done = await wait_for(again, job.id, "done")
    assert (done.attempt, done.errors) == (1, [])
    assert probe.runs["j"] == 1


async def test_a_start_stored_but_unanswered_is_queued_again_at_once(
    tmp_path: Any,
) -> None:
    """A running write that lands but whose answer is lost (the store went away
    mid-call) leaves no job stranded for its lease: once the store answers, the
    worker queues it again, uncharged, and it runs."""
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0, stages=1))
    manager = JobManager(
        db_path=tmp_path / "jobs.db",
        registry=registry,
        worker_count=1,
        lease_seconds=120,
        poll_seconds=0.5,
    )
    await manager.start()
    try:
        real = manager.store.update_many
        lost: list[str] = []

        async def lands_unanswered(updates: Any) -> Any:
            results = await real(updates)
            if not lost:
                lost.extend(u.job_id for u in updates)
                raise StoreError("the connection closed before the answer")
            return results

        manager.store.update_many = lands_unanswered  # type: ignore[method-assign]
        job = await manager.submit("noop")
        done = await wait_for(manager, job.id, "done", timeout=10)
    finally:
        await manager.close()
    assert lost == [job.id]
    assert done.attempt == 1 and done.errors == []
