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
