"""Issue 2's acceptance list on the embedded default (SQLite store + memory queue)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from backgrounder import (
    Assets,
    ConfigurationError,
    Job,
    JobManager,
    JobStatus,
    NoopRunner,
    RunContext,
    Stage,
    TaskRegistry,
)
from backgrounder.errors import IdempotencyConflictError
from backgrounder.settings import ManagerSettings
from backgrounder_testing import FakeClock
from tests.backgrounder.casekit import Probe, drive_until, settle, started
from tests.conftest import ManagerFactory, wait_for


class MyTask:
    """The README's runner, word for word."""

    async def execute(self, job: Job, ctx: RunContext) -> Assets:
        await ctx.progress(10, Stage.fetch, 1, 10)
        await ctx.check_canceled()
        return Assets(custom={"output": {"href": f"/out/{job.id}.json"}})


async def test_seed_api_as_the_readme_writes_it(make_manager: ManagerFactory) -> None:
    """``TaskRegistry().add("my-task", NoopRunner())`` and an execute -> Assets run."""
    registry = TaskRegistry()
    registry.add("my-task", NoopRunner())
    registry.add("mine", MyTask())
    manager = await make_manager(registry, worker_count=2)

    noop = await manager.submit("my-task")
    mine = await manager.submit("mine", {"x": 1})

    noop_done = await wait_for(manager, noop.id, "done")
    mine_done = await wait_for(manager, mine.id, "done")
    assert noop_done.progress.percent == 100
    assert noop_done.assets == Assets(custom={"stages": 5})
    assert mine_done.progress.stage == Stage.fetch
    assert (mine_done.progress.processed, mine_done.progress.total) == (1, 10)
    assert await manager.assets(mine.id) == Assets(
        custom={"output": {"href": f"/out/{mine.id}.json"}}
    )


def _non_default(name: str, field: Any) -> Any:
    """A valid value for a ManagerSettings field that differs from its default."""
    special: dict[str, Any] = {
        "worker_count": 3,
        "lease_seconds": 12.0,
        "heartbeat_seconds": 2.0,
        "recovery_interval_seconds": 1.5,
        "cancel_grace_seconds": 0.5,
        "shutdown_grace_seconds": 2.5,
        "retry_backoff_seconds": 0.2,
        "retry_backoff_max_seconds": 7.0,
        "default_timeout_seconds": 42.0,
        "default_max_retries": 4,
        "max_params_bytes": 2048,
        "max_params_depth": 8,
        "idempotency_ttl_seconds": 60.0,
        "progress_interval_seconds": 0.05,
        "poll_seconds": 0.3,
        "event_poll_seconds": 0.1,
        "expose_tracebacks": True,
    }
    assert name in special, f"new setting {name!r}: give the test a value for it"
    assert special[name] != field.default
    return special[name]


async def test_every_default_is_a_keyword_option_of_job_manager(
    tmp_path: Path,
) -> None:
    """Each ManagerSettings field is a JobManager keyword and reads back as given."""
    fields = ManagerSettings.model_fields
    for name in ("lease_seconds", "cancel_grace_seconds", "shutdown_grace_seconds"):
        assert name in fields
    options = {name: _non_default(name, f) for name, f in fields.items()}

    manager = JobManager(db_path=tmp_path / "jobs.db", **options)

    for name, value in options.items():
        assert getattr(manager.settings, name) == value, name
    with pytest.raises(ConfigurationError, match="lease_secs"):
        JobManager(db_path=tmp_path / "jobs.db", lease_secs=3)
    with pytest.raises(ConfigurationError, match="heartbeat_seconds"):
        JobManager(db_path=tmp_path / "jobs.db", lease_seconds=3, heartbeat_seconds=5)


async def test_jobs_queued_when_the_process_stopped_run_after_restart(
    make_manager: ManagerFactory, tmp_path: Path
) -> None:
    """Jobs left queued by a closed manager run when a new one opens the file."""
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0))
    api = await make_manager(registry, worker_count=0)
    ids = [(await api.submit("noop", {"i": i})).id for i in range(5)]
    await api.close()

    worker = await make_manager(registry, worker_count=2)

    for job_id in ids:
        job = await wait_for(worker, job_id, "done")
        assert job.attempt == 1


async def test_twenty_concurrent_submits_with_one_key_make_one_job(
    make_manager: ManagerFactory,
) -> None:
    """One idempotency key: one job; the same key with other params is a conflict."""
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0))
    registry.add("other", NoopRunner(sleep_ms=0))
    manager = await make_manager(registry, worker_count=0)

    results = await asyncio.gather(
        *(
            manager.submit_or_get("noop", {"a": 1}, idempotency_key="k")
            for _ in range(20)
        )
    )

    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len((await manager.list()).items) == 1
    with pytest.raises(IdempotencyConflictError, match="'k'"):
        await manager.submit("noop", {"a": 2}, idempotency_key="k")
    with pytest.raises(IdempotencyConflictError):
        await manager.submit("other", {"a": 1}, idempotency_key="k")
    assert len((await manager.list()).items) == 1


class ProgressFlood:
    """Writes progress in a tight loop and never looks at cancellation."""

    def __init__(self) -> None:
        self.count = 0
        self.stop = asyncio.Event()

    async def execute(self, job: Job, ctx: RunContext) -> None:
        while not self.stop.is_set():
            self.count += 1
            await ctx.progress(self.count % 100, Stage.infer, self.count)


async def test_progress_in_a_tight_loop_cannot_erase_a_cancel_request(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """After cancel, later progress writes land but cancel_requested stays set."""
    runner = ProgressFlood()
    registry = TaskRegistry()
    registry.add("flood", runner)
    manager = await make_manager(
        registry, clock=clock, progress_interval_seconds=0, cancel_grace_seconds=30
    )
    job = await manager.submit("flood")
    await wait_for(manager, job.id, "running")
    async with asyncio.timeout(10):
        while (await manager.get(job.id)).progress.processed == 0:
            await asyncio.sleep(0)

    requested = await manager.cancel(job.id)
    assert requested.cancel_requested
    mark = runner.count
    async with asyncio.timeout(10):
        while True:
            seen = await manager.get(job.id)
            if seen.progress.processed > mark + 50:
                break
    assert seen.status == JobStatus.running
    assert seen.cancel_requested is True

    await clock.advance_async(30)
    final = await wait_for(manager, job.id, "canceled")
    assert final.cancel_requested is True
    assert final.error is not None and final.error.code == "canceled"


async def test_stale_worker_cannot_complete_or_fail_the_new_attempt(
    tmp_path: Path,
) -> None:
    """Worker 1 loses its lease to worker 2; its late ending changes nothing."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    db = tmp_path / "jobs.db"
    clock1, clock2 = FakeClock(), FakeClock()
    first = JobManager(
        db_path=db,
        registry=registry,
        clock=clock1,
        lease_seconds=3,
        worker_id="w1",
        worker_count=2,
    )
    await first.start()
    second = None
    try:
        ok = await first.submit(
            "probe", {"name": "ok", "block": True, "per_attempt": True}, max_retries=1
        )
        bad = await first.submit(
            "probe",
            {"name": "bad", "block": True, "per_attempt": True, "fail_on": [1]},
            max_retries=1,
        )
        await started(probe, "ok#1")
        await started(probe, "bad#1")
        # Worker 1 is paused (its clock never moves); on worker 2's clock the
        # leases ran out long ago, so worker 2 recovers both jobs and runs them.
        clock2.advance(3600)
        second = JobManager(
            db_path=db,
            registry=registry,
            clock=clock2,
            lease_seconds=3,
            worker_id="w2",
            worker_count=2,
            retry_backoff_seconds=0,
        )
        await second.start()
        await started(probe, "ok#2")
        await started(probe, "bad#2")

        # Worker 1's attempts end now: "ok" returns, "bad" raises. Neither lands.
        probe.gates["ok#1"].set()
        probe.gates["bad#1"].set()
        async with asyncio.timeout(10):
            while first.worker.running:
                await settle(first)
        for job in (ok, bad):
            now = await second.get(job.id)
            assert (now.status, now.attempt, now.worker_id) == ("running", 2, "w2")
            assert now.assets is None
            assert [e.code for e in now.errors] == ["worker_lost"]

        probe.gates["ok#2"].set()
        probe.gates["bad#2"].set()
        for job in (ok, bad):
            done = await wait_for(second, job.id, "done")
            assert done.attempt == 2
            assert done.assets is not None and done.assets.custom["attempt"] == 2
            assert [e.code for e in done.errors] == ["worker_lost"]
    finally:
        if second is not None:
            await second.close(drain=False)
        await first.close(drain=False)


async def test_stale_worker_failure_does_not_fail_the_new_attempt(
    tmp_path: Path,
) -> None:
    """An attempt that raises after its lease was taken over writes nothing."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    db = tmp_path / "jobs.db"
    clock1, clock2 = FakeClock(), FakeClock()
    first = JobManager(db_path=db, registry=registry, clock=clock1, lease_seconds=3)
    await first.start()
    second = JobManager(
        db_path=db, registry=registry, clock=clock2, lease_seconds=3, worker_count=0
    )
    try:
        job = await first.submit(
            "probe", {"name": "x", "block": True, "fail": True}, max_retries=3
        )
        await started(probe, "x")
        clock2.advance(3600)
        await second.start()  # recovers attempt 1 as worker_lost: queued attempt 2
        moved = await second.get(job.id)
        assert (moved.status, moved.attempt) == (JobStatus.queued, 2)

        probe.gates["x"].set()  # attempt 1 raises now, on worker 1
        async with asyncio.timeout(10):
            while first.worker.running:
                await settle(first)

        after = await second.get(job.id)
        assert (after.status, after.attempt, after.retries) == (JobStatus.queued, 2, 1)
        assert [e.code for e in after.errors] == ["worker_lost"]
    finally:
        await second.close(drain=False)
        await first.close(drain=False)


async def test_priority_order_and_fifo_within_a_priority(
    make_manager: ManagerFactory,
) -> None:
    """Higher priority runs first; equal priorities run in submission order."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    manager = await make_manager(registry, worker_count=1)
    blocker = await manager.submit("probe", {"name": "X", "block": True})
    await started(probe, "X")
    plan = [("a", 10), ("b", 90), ("c", 50), ("d", 90), ("e", 10), ("f", 50)]
    ids = [(await manager.submit("probe", {"name": n}, priority=p)).id for n, p in plan]

    probe.gates["X"].set()
    await wait_for(manager, blocker.id, "done")
    for job_id in ids:
        await wait_for(manager, job_id, "done")

    assert probe.order == ["X", "b", "d", "c", "f", "a", "e"]


async def test_cancel_of_a_queued_job_means_it_never_starts(
    make_manager: ManagerFactory,
) -> None:
    """A queued job canceled before its turn never runs and has no started_at."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    manager = await make_manager(registry, worker_count=1)
    blocker = await manager.submit("probe", {"name": "A", "block": True})
    await started(probe, "A")
    queued = await manager.submit("probe", {"name": "B"})

    canceled = await manager.cancel(queued.id)
    assert canceled.status == JobStatus.canceled
    assert (await manager.cancel(queued.id)).status == JobStatus.canceled  # no-op
    probe.gates["A"].set()
    await wait_for(manager, blocker.id, "done")
    after = await manager.submit("probe", {"name": "C"})
    await wait_for(manager, after.id, "done")

    final = await manager.get(queued.id)
    assert probe.runs["B"] == 0
    assert final.status == JobStatus.canceled
    assert final.started_at is None


async def test_timeout_gives_failed_with_code_timeout(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """A runner over timeout_seconds fails with error.code timeout, not before."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    manager = await make_manager(registry, clock=clock)
    job = await manager.submit(
        "probe", {"name": "slow", "block": True, "stage": "infer"}, timeout_seconds=10
    )
    await started(probe, "slow")

    await clock.advance_async(9.5)
    await settle(manager)
    assert (await manager.get(job.id)).status == JobStatus.running
    await clock.advance_async(0.6)
    failed = await wait_for(manager, job.id, "failed")

    assert failed.error is not None
    assert failed.error.code == "timeout"
    assert failed.error.stage == Stage.infer
    assert failed.cancel_requested is False
    assert failed.attempt == 1


async def test_max_retries_zero_runs_exactly_once(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """max_retries=0 beats a task default of 5: one run, failed, attempt 1."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe, max_retries=5)
    manager = await make_manager(registry, clock=clock, default_max_retries=3)
    job = await manager.submit("probe", {"name": "p", "fail": True}, max_retries=0)
    assert job.max_retries == 0

    failed = await wait_for(manager, job.id, "failed")
    await clock.advance_async(3600)
    await settle(manager)

    assert probe.runs["p"] == 1
    assert (failed.attempt, failed.retries, failed.max_retries) == (1, 0, 0)
    assert (await manager.get(job.id)).status == JobStatus.failed


async def test_retried_canceled_job_starts_with_cancel_requested_cleared(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """retry(): attempt + 1, fresh started_at, no error, no cancel; history kept."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    manager = await make_manager(registry, clock=clock)
    job = await manager.submit("probe", {"name": "r", "block": True})
    await started(probe, "r")
    first = await manager.get(job.id)
    await manager.cancel(job.id)
    canceled = await drive_until(clock, manager, job.id, lambda j: j.is_terminal)
    assert canceled.status == JobStatus.canceled
    assert canceled.cancel_requested is True
    assert canceled.error is not None and canceled.error.code == "canceled"

    probe.started.clear()
    await clock.advance_async(5)
    retried = await manager.retry(job.id)
    assert retried.status == JobStatus.queued
    assert retried.cancel_requested is False
    assert retried.error is None
    assert retried.attempt == 2
    await started(probe, "r")
    running = await wait_for(manager, job.id, "running")
    assert running.cancel_requested is False
    assert running.started_at is not None and first.started_at is not None
    assert running.started_at > first.started_at
    probe.gates["r"].set()
    done = await wait_for(manager, job.id, "done")

    assert done.attempt == 2
    assert done.created_at == job.created_at
    assert done.error is None
    assert [e.code for e in done.errors] == ["canceled"]
    assert done.assets is not None and done.assets.custom["attempt"] == 2


@pytest.mark.parametrize("stage", ["fetch", "infer", "write"])
async def test_error_stage_is_the_stage_the_job_had_reached(
    make_manager: ManagerFactory, stage: str
) -> None:
    """A failure's error.stage is the job's last reported stage."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    manager = await make_manager(registry)
    job = await manager.submit("probe", {"name": "s", "fail": True, "stage": stage})

    failed = await wait_for(manager, job.id, "failed")

    assert failed.error is not None
    assert failed.error.stage == stage
    assert failed.error.code == "execution_error"
    assert failed.error.type == "RuntimeError"
    assert failed.progress.stage == stage
