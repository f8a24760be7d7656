"""Shared fixtures of the project's own tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from backgrounder import JobManager, JobStatus, TaskRegistry
from backgrounder.models import Job
from backgrounder_testing import FakeClock

ManagerFactory = Callable[..., Awaitable[JobManager]]


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock for the test."""
    return FakeClock()


@pytest.fixture
async def make_manager(tmp_path: Path) -> AsyncIterator[ManagerFactory]:
    """Return a factory of started JobManagers on a temp SQLite file."""
    managers: list[JobManager] = []

    async def factory(registry: TaskRegistry, **options: Any) -> JobManager:
        options.setdefault("db_path", tmp_path / "jobs.db")
        manager = JobManager(registry=registry, **options)
        await manager.start()
        managers.append(manager)
        return manager

    yield factory
    for manager in reversed(managers):
        await manager.close(drain=False)


async def wait_for(
    manager: JobManager,
    job_id: str,
    *statuses: str,
    timeout: float = 10.0,
) -> Job:
    """Wait, through the job's event stream, until it reaches one of ``statuses``."""
    wanted = {JobStatus(s) for s in statuses} or {
        JobStatus.done,
        JobStatus.failed,
        JobStatus.canceled,
    }
    async with asyncio.timeout(timeout):
        while True:
            async for event in manager.events(job_id):
                if event.job.status in wanted:
                    return event.job
            job = await manager.get(job_id)
            if job.status in wanted:
                return job
            raise AssertionError(f"job {job_id} ended {job.status}, not {wanted}")
