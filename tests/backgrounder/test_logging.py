"""Structured logs: one record per job transition, its context in ``extra``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from backgrounder import Job, NoopRunner, RunContext, TaskRegistry
from tests.conftest import ManagerFactory, wait_for

#: Events that end an attempt, so their records carry its duration.
FINISHING = {"job.done", "job.failed", "job.canceled", "job.retry_scheduled"}


class Fails:
    async def execute(self, job: Job, ctx: RunContext) -> None:
        raise RuntimeError("the input is corrupt")


class Waits:
    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def execute(self, job: Job, ctx: RunContext) -> None:
        self.started.set()
        await ctx.sleep(60)


def _records(caplog: pytest.LogCaptureFixture, job_id: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for record in caplog.records:
        if getattr(record, "job_id", None) == job_id:
            found.setdefault(getattr(record, "event", None), record)
    return found


async def test_logging_transitions_carry_job_task_attempt_worker_and_duration(
    make_manager: ManagerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Each transition logs once with job_id, task, attempt, worker_id and event."""
    waits = Waits()
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0))
    registry.add("fails", Fails())
    registry.add("waits", waits)
    manager = await make_manager(registry, worker_count=2, retry_backoff_seconds=0)
    caplog.set_level(logging.INFO, logger="backgrounder")

    done = await manager.submit("noop")
    await wait_for(manager, done.id)
    failed = await manager.submit("fails", max_retries=1)
    await wait_for(manager, failed.id, "failed")
    canceled = await manager.submit("waits")
    await asyncio.wait_for(waits.started.wait(), 10)
    await manager.cancel(canceled.id)
    await wait_for(manager, canceled.id, "canceled")

    expected = {
        done.id: ("noop", ["job.submitted", "job.started", "job.done"]),
        failed.id: (
            "fails",
            ["job.submitted", "job.started", "job.retry_scheduled", "job.failed"],
        ),
        canceled.id: (
            "waits",
            ["job.submitted", "job.started", "job.cancel_requested", "job.canceled"],
        ),
    }
    for job_id, (task, events) in expected.items():
        records = _records(caplog, job_id)
        assert set(events) <= set(records), (job_id, sorted(records))
        for event in events:
            record = records[event]
            assert record.task == task
            assert record.attempt >= 1
            assert job_id in record.getMessage()
            if event != "job.submitted" and event != "job.cancel_requested":
                assert record.worker_id, (event, record.worker_id)
            if event in FINISHING:
                assert isinstance(record.duration, float), event
                assert record.duration >= 0
    assert _records(caplog, failed.id)["job.failed"].attempt == 2
    assert _records(caplog, failed.id)["job.failed"].levelno == logging.ERROR
    assert _records(caplog, done.id)["job.done"].levelno == logging.INFO


async def test_logging_started_lines_name_the_worker_that_runs_the_job(
    make_manager: ManagerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The started record's worker_id is the worker the job reports."""
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0))
    manager = await make_manager(registry, worker_id="host-a:1")
    caplog.set_level(logging.INFO, logger="backgrounder")

    job = await manager.submit("noop")
    finished = await wait_for(manager, job.id)

    started = _records(caplog, job.id)["job.started"]
    assert started.worker_id == finished.worker_id
    assert started.worker_id.startswith("host-a:1")
