"""A JobManager with its own worker behaves the same on every store and queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from backgrounder import JobManager, JobStatus, NoopRunner, TaskRegistry
from backgrounder.errors import CorruptJobError
from backgrounder.models import Job
from backgrounder.queue.base import JobQueue
from backgrounder.store.base import JobStore
from backgrounder.tasks import RunContext
from tests.conftest import wait_for
from tests.contract.conftest import _make_queue, _make_store, damage


class FlakyOnce:
    """Fails its first attempt, succeeds on the next."""

    async def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return {"attempt": ctx.attempt}


class Sleeper:
    """Sleeps cooperatively until canceled; tells the test it started."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def execute(self, job: Job, ctx: RunContext) -> None:
        self.started.set()
        await ctx.sleep(60)


@pytest.fixture
async def manager(backends: tuple[JobStore, JobQueue]) -> AsyncIterator[JobManager]:
    store, queue = backends
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0, stages=2))
    registry.add("flaky", FlakyOnce(), max_retries=1)
    registry.add("sleep", Sleeper())
    manager = JobManager(
        store=store,
        queue=queue,
        registry=registry,
        worker_count=4,
        retry_backoff_seconds=0.01,
        retry_backoff_max_seconds=0.02,
        poll_seconds=0.5,
    )
    await manager.start()
    yield manager
    await manager.close(drain=False)


async def test_every_submitted_job_ends_done(manager: JobManager) -> None:
    jobs = [await manager.submit("noop", {"i": i}) for i in range(30)]
    for job in jobs:
        done = await wait_for(manager, job.id, "done")
        assert done.attempt == 1 and done.progress.percent == 100
    counts = await manager.store.count_by_status()
    assert counts[JobStatus.done] == 30
    assert await manager.queue.size() == 0


async def test_a_failed_attempt_is_retried_as_attempt_two(manager: JobManager) -> None:
    job = await manager.submit("flaky")
    done = await wait_for(manager, job.id, "done")
    assert done.attempt == 2 and done.retries == 1
    assert [e.message for e in done.errors] == ["first attempt fails"]
    assert done.assets is not None and done.assets.custom == {"attempt": 2}


async def test_idempotent_submit_returns_the_same_job(manager: JobManager) -> None:
    first, created = await manager.submit_or_get("noop", {"a": 1}, idempotency_key="k")
    again, created_again = await manager.submit_or_get(
        "noop", {"a": 1}, idempotency_key="k"
    )
    assert created and not created_again and again.id == first.id


async def test_cancel_of_a_running_job(manager: JobManager) -> None:
    sleeper = manager.registry.get("sleep").runner  # type: ignore[union-attr]
    job = await manager.submit("sleep")
    async with asyncio.timeout(10):
        await sleeper.started.wait()
    await manager.cancel(job.id)
    canceled = await wait_for(manager, job.id, "canceled")
    assert canceled.error is not None and canceled.error.code == "canceled"


async def test_health_is_ok(manager: JobManager) -> None:
    report = await manager.health()
    assert report["ok"], report


async def test_a_damaged_queued_job_does_not_stop_the_rest(
    backend: str,
    tmp_path: Path,
    fake_server: fakeredis.FakeServer,
    redis_prefix: str,
) -> None:
    """A manager starts on a store holding a queued job nobody can read, runs
    every other job to done, and reading the damaged one names it."""
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0, stages=1))

    def build(workers: int) -> JobManager:
        return JobManager(
            store=_make_store(backend, tmp_path, fake_server, redis_prefix),
            queue=_make_queue(backend, fake_server, redis_prefix),
            registry=registry,
            worker_count=workers,
            poll_seconds=0.5,
        )

    first = build(0)
    await first.start()
    jobs = [await first.submit("noop", {"i": i}) for i in range(4)]
    await damage(first.store, jobs[1].id)
    await first.close()
    second = build(4)
    await second.start()
    try:
        for job in (jobs[0], jobs[2], jobs[3]):
            await wait_for(second, job.id, "done")
        with pytest.raises(CorruptJobError, match=jobs[1].id):
            await second.get(jobs[1].id)
    finally:
        await second.close(drain=False)
