"""The job lifecycle on the embedded default (SQLite store + memory queue)."""

from __future__ import annotations

import asyncio

import pytest

from backgrounder import (
    Assets,
    Job,
    JobStatus,
    NoopRunner,
    RunContext,
    Stage,
    TaskRegistry,
)
from backgrounder.errors import IdempotencyConflictError, UnknownTaskError
from tests.conftest import ManagerFactory, wait_for


class Report:
    """A runner as the README writes it."""

    async def execute(self, job: Job, ctx: RunContext) -> Assets:
        for i in range(1, 11):
            await ctx.progress(i * 10, Stage.fetch, i, 10)
            await ctx.check_canceled()
        return Assets(custom={"output": {"href": f"/reports/{job.id}.json"}})


async def test_lifecycle_runs_readme_runner_to_done(
    make_manager: ManagerFactory,
) -> None:
    """A runner written as the README shows ends done with its assets and progress."""
    registry = TaskRegistry()
    registry.add("report", Report())
    manager = await make_manager(registry)

    job = await manager.submit("report", {"n": 1})
    assert job.status == JobStatus.queued
    done = await wait_for(manager, job.id, "done")

    assert done.progress.percent == 100
    assert done.progress.stage == Stage.fetch
    assert (done.progress.processed, done.progress.total) == (10, 10)
    assert await manager.assets(job.id) == Assets(
        custom={"output": {"href": f"/reports/{job.id}.json"}}
    )
    assert done.started_at is not None and done.finished_at is not None
    assert done.created_at <= done.started_at <= done.finished_at


async def test_lifecycle_rejects_unknown_task(make_manager: ManagerFactory) -> None:
    """An unknown task is refused at submit with the registered names."""
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0))
    manager = await make_manager(registry, worker_count=0)

    with pytest.raises(UnknownTaskError, match="registered tasks: 'noop'"):
        await manager.submit("nope")


async def test_lifecycle_idempotency_one_job_for_concurrent_submits(
    make_manager: ManagerFactory,
) -> None:
    """20 concurrent submits with one key make one job; other params conflict."""
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0))
    manager = await make_manager(registry, worker_count=0)

    jobs = await asyncio.gather(
        *(manager.submit("noop", {"a": 1}, idempotency_key="k1") for _ in range(20))
    )

    assert len({j.id for j in jobs}) == 1
    page = await manager.list()
    assert len(page.items) == 1
    with pytest.raises(IdempotencyConflictError, match="k1"):
        await manager.submit("noop", {"a": 2}, idempotency_key="k1")


class Gate:
    """Holds its job running until ``opened`` is set; records attempts seen."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()
        self.attempts: list[tuple[str, int]] = []

    async def execute(self, job: Job, ctx: RunContext) -> None:
        self.attempts.append((job.params.get("name", ""), ctx.attempt))
        if job.params.get("hold"):
            self.entered.set()
            await self.opened.wait()


async def test_lifecycle_job_canceled_and_retried_before_pickup_runs_once(
    make_manager: ManagerFactory,
) -> None:
    """A job canceled then retried while it waits runs once, as its new attempt.

    Its first queue entry is stale by the time the busy worker gets to it: the
    worker must start the retried attempt, not drop the job or run it twice.
    """
    gate = Gate()
    registry = TaskRegistry()
    registry.add("gate", gate)
    manager = await make_manager(registry, worker_count=1)

    blocker = await manager.submit("gate", {"hold": True, "name": "blocker"})
    await asyncio.wait_for(gate.entered.wait(), 10)
    job = await manager.submit("gate", {"name": "waiter"})
    await manager.cancel(job.id)
    retried = await manager.retry(job.id)
    assert retried.status == JobStatus.queued and retried.attempt == 2
    gate.opened.set()

    done = await wait_for(manager, job.id, "done")
    await wait_for(manager, blocker.id, "done")
    assert done.attempt == 2
    assert gate.attempts == [("blocker", 1), ("waiter", 2)]
