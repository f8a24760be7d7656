"""Many concurrent submits, cancels and list polls against an in-process manager.

A JobManager with four in-process workers on a temp SQLite file takes a burst
of submits (a third of them reusing idempotency keys) while cancels of random
jobs and list polls arrive; the runner records every (job, attempt) it runs and
fails some attempts so retries happen. At the end no job may be lost or
duplicated, each attempt must have run at most once, every job must be terminal
and every reservation released.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backgrounder import Job, JobManager, JobStatus, RunContext, TaskRegistry
from backgrounder.errors import JobStateError
from tests.conftest import wait_for
from tests.reliability.backends import BACKEND_PARAMS, Backend

TERMINAL = {JobStatus.done, JobStatus.failed, JobStatus.canceled}


class RecordingRunner:
    """Counts each (job, attempt) it runs; fails attempts as the params ask."""

    def __init__(self) -> None:
        self.runs: Counter[tuple[str, int]] = Counter()

    async def execute(self, job: Job, ctx: RunContext) -> None:
        self.runs[(job.id, ctx.attempt)] += 1
        await ctx.progress(50)
        await ctx.sleep(random.uniform(0, 0.002))
        fail = job.params.get("fail")
        if fail == "always" or (fail == "first" and ctx.attempt == 1):
            raise RuntimeError(f"attempt {ctx.attempt} of this job fails ({fail})")


@dataclass
class LoadRun:
    """What one load run saw."""

    submitted: int = 0
    replays: int = 0
    ids: set[str] = field(default_factory=set)
    order: list[str] = field(default_factory=list)
    by_key: dict[str, set[str]] = field(default_factory=dict)
    cancels: int = 0
    refused_cancels: int = 0
    polls: int = 0
    unexpected: list[BaseException] = field(default_factory=list)
    final: Counter[str] = field(default_factory=Counter)
    cancel_answered: set[str] = field(default_factory=set)
    done_after_cancel: int = 0


async def _submitter(
    manager: JobManager, plan: asyncio.Queue[tuple[int, str | None]], run: LoadRun
) -> None:
    while True:
        try:
            i, key = plan.get_nowait()
        except asyncio.QueueEmpty:
            return
        n = i // 9 if key is not None else i
        fail = "always" if n % 11 == 0 else "first" if n % 7 == 0 else None
        params: dict[str, Any] = {"fail": fail, "i": i}
        if key is not None:
            params = {"fail": fail, "key": key}
        try:
            job, created = await manager.submit_or_get(
                "load", params, priority=i % 101, idempotency_key=key
            )
        except Exception as exc:
            run.unexpected.append(exc)
            continue
        run.submitted += 1
        if created:
            run.order.append(job.id)
        run.ids.add(job.id)
        if key is not None:
            run.by_key.setdefault(key, set()).add(job.id)
        if not created:
            run.replays += 1


async def _canceller(
    manager: JobManager, run: LoadRun, stop: asyncio.Event, seed: int
) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        await asyncio.sleep(0)
        if not run.order:
            continue
        job_id = rng.choice(run.order)
        try:
            answered = await manager.cancel(job_id)
            run.cancels += 1
            run.cancel_answered.add(answered.id)
        except JobStateError:
            run.refused_cancels += 1
        except Exception as exc:
            run.unexpected.append(exc)


async def _poller(manager: JobManager, run: LoadRun, stop: asyncio.Event) -> None:
    statuses: list[JobStatus | None] = [None, *JobStatus]
    while not stop.is_set():
        try:
            page = await manager.list(status=statuses[run.polls % len(statuses)])
            if page.next_cursor is not None:
                await manager.list(cursor=page.next_cursor, limit=20)
            run.polls += 1
        except Exception as exc:
            run.unexpected.append(exc)
        await asyncio.sleep(0)


async def run_load(backend: Backend, folder: Path, submits: int) -> LoadRun:
    """Push ``submits`` submits through a manager with workers; check the end."""
    runner = RecordingRunner()
    registry = TaskRegistry()
    registry.add("load", runner, max_retries=1)
    store, queue = backend.make(folder)
    manager = JobManager(
        store=store,
        queue=queue,
        registry=registry,
        worker_count=4,
        retry_backoff_seconds=0.001,
        retry_backoff_max_seconds=0.01,
        poll_seconds=0.05,
        event_poll_seconds=0.05,
    )
    run = LoadRun()
    plan: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()
    for i in range(submits):
        # A third of the submits share keys, each key used three times.
        plan.put_nowait((i, f"key-{i // 9}" if i % 3 == 0 else None))
    stop = asyncio.Event()
    async with manager:
        side = [
            *(asyncio.create_task(_canceller(manager, run, stop, s)) for s in range(4)),
            *(asyncio.create_task(_poller(manager, run, stop)) for _ in range(2)),
        ]
        await asyncio.gather(*(_submitter(manager, plan, run) for _ in range(32)))
        stop.set()
        await asyncio.gather(*side)
        async with asyncio.timeout(60 + submits / 50):
            for job_id in sorted(run.ids):
                await wait_for(manager, job_id, timeout=60 + submits / 50)
        jobs = [await manager.get(job_id) for job_id in sorted(run.ids)]
        counts = await manager.store.count_by_status()
        listed = await _list_all(manager)
    await backend.cleanup(store, queue)
    _check(run, runner, jobs, counts, listed, manager, submits)
    return run


async def _list_all(manager: JobManager) -> list[Job]:
    """Page through every job with list cursors."""
    page = await manager.list(limit=1000)
    jobs = list(page.items)
    while page.next_cursor is not None:
        page = await manager.list(limit=1000, cursor=page.next_cursor)
        jobs.extend(page.items)
    return jobs


def _check(
    run: LoadRun,
    runner: RecordingRunner,
    jobs: list[Job],
    counts: dict[JobStatus, int],
    listed: list[Job],
    manager: JobManager,
    submits: int,
) -> None:
    assert not run.unexpected, f"unexpected errors: {run.unexpected[:5]}"
    assert run.submitted == submits
    # No lost job: every id readable; no duplicate: one job per key, no extras.
    assert len(jobs) == len(run.ids)
    assert all(len(ids) == 1 for ids in run.by_key.values())
    assert len(run.ids) == submits - run.replays
    assert sum(counts.values()) == len(run.ids)
    assert len(listed) == len(run.ids) and {j.id for j in listed} == run.ids
    # Every job terminal; every attempt ran at most once.
    assert all(j.status in TERMINAL for j in jobs)
    twice = [k for k, n in runner.runs.items() if n > 1]
    assert not twice, f"attempts run twice: {twice[:5]}"
    for job in jobs:
        if job.status == JobStatus.done:
            assert runner.runs[(job.id, job.attempt)] == 1
    assert manager.resources.running_jobs == 0
    run.final.update(str(j.status) for j in jobs)
    # A cancel answered just after the runner returned ends canceled since the
    # done write requires no cancel request (B15); counted for the figures.
    run.done_after_cancel = sum(
        1 for j in jobs if j.id in run.cancel_answered and j.status == JobStatus.done
    )


def _report(run: LoadRun, backend: Backend) -> None:
    print(
        f"\nload on {backend.name}: {run.submitted} submits, {len(run.ids)} jobs, "
        f"{run.replays} key replays, {run.cancels} cancels "
        f"({run.refused_cancels} refused), {run.polls} list polls; "
        f"final {dict(run.final)}; lost 0, duplicated 0; "
        f"done after an answered cancel {run.done_after_cancel}"
    )


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
async def test_load_submits_cancels_polls(backend: Backend, tmp_path: Path) -> None:
    """1,000 concurrent submits with cancels and polls: nothing lost or doubled."""
    run = await run_load(backend, tmp_path, 1000)
    _report(run, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
async def test_load_submits_cancels_polls_long(
    backend: Backend, tmp_path: Path
) -> None:
    """The same load with 20,000 submits."""
    run = await run_load(backend, tmp_path, 20_000)
    _report(run, backend)
