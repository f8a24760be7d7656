"""Real processes on one SQLite file: killed, crashed, restarted, and exiting.

Each test runs ``crash_child.py`` (a JobManager in its own process) and waits on
the lines it prints. Waits are bounded by ``asyncio.timeout``; the only real
delays are the scenario's own (a lease of 1 s running out, B04's kill timing).

Tests taking the ``backend`` fixture run twice: on the SQLite file with a memory
queue per process, and on the real Redis server (Redis store and queue, shared
by every process; skipped, saying so, when BACKGROUNDER_REDIS_URL is unset).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from backgrounder import JobManager, JobStatus, TaskRegistry
from backgrounder.models import Job
from backgrounder_redis import RedisQueue, RedisStore
from tests.conftest import wait_for
from tests.integration.redis_tools import (
    REDIS_URL,
    delete_prefix,
    needs_redis,
    unique_prefix,
)

CHILD = Path(__file__).with_name("crash_child.py")
ROOT = Path(__file__).resolve().parents[2]
FAST = {"lease_seconds": 1.0, "retry_backoff_seconds": 0.05}


@dataclass
class Backend:
    """Where a test's processes keep their jobs: the SQLite file ``db`` (each
    process with its own memory queue), or Redis on ``redis["prefix"]``."""

    db: Path
    redis: dict[str, str] | None = None

    def options(self) -> dict[str, Any]:
        """JobManager options of a manager in the test process."""
        if self.redis is None:
            return {"db_path": self.db}
        url, prefix = self.redis["url"], self.redis["prefix"]
        return {
            "store": RedisStore(url, prefix=prefix),
            "queue": RedisQueue(url, prefix=prefix),
        }

    def child(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """A child's options, naming the Redis prefix when there is one."""
        options = dict(options or {})
        if self.redis is not None:
            options["redis"] = self.redis
        return options


@pytest.fixture(
    params=["sqlite", pytest.param("redis", marks=[needs_redis, pytest.mark.redis])]
)
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Backend]:
    """The SQLite file, or the real Redis server on a fresh key prefix."""
    db = tmp_path / "jobs.db"
    if request.param == "sqlite":
        yield Backend(db)
        return
    assert REDIS_URL
    prefix = unique_prefix()
    yield Backend(db, {"url": REDIS_URL, "prefix": prefix})
    await delete_prefix(REDIS_URL, prefix)


class Child:
    """One child process and the lines it printed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(
        cls,
        db: Path,
        mode: str,
        options: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-W",
            "always::ResourceWarning",
            str(CHILD),
            str(db),
            mode,
            json.dumps(options or {}),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        return cls(proc)

    async def line(self, prefix: str, timeout: float = 30.0) -> str:
        """Return the next printed line that starts with ``prefix``."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(
                        f"child exited before printing {prefix!r}: {self.lines}"
                    )
                text = raw.decode().rstrip("\n")
                self.lines.append(text)
                if text.startswith(prefix):
                    return text

    async def finish(self, timeout: float = 60.0) -> tuple[int, str]:
        """Wait for the exit; return the code and stderr (stdout lines are kept)."""
        async with asyncio.timeout(timeout):
            out, err = await self.proc.communicate()
        self.lines.extend(out.decode().splitlines())
        assert self.proc.returncode is not None
        return self.proc.returncode, err.decode()

    async def kill(self) -> None:
        """SIGKILL the child and reap it."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await self.finish()

    def starts(self) -> list[tuple[str, int]]:
        return [
            (parts[1], int(parts[2]))
            for parts in (line.split() for line in self.lines)
            if parts and parts[0] == "started"
        ]


async def submit(
    where: Path | Backend, *jobs: tuple[str, dict[str, Any], dict[str, Any]]
) -> list[Job]:
    """Store jobs through a manager with no workers, then close it."""
    where = where if isinstance(where, Backend) else Backend(where)
    registry = TaskRegistry()
    for task in ("work", "chatty", "flaky", "noop"):
        registry.add(task, _Never())
    async with JobManager(registry=registry, worker_count=0, **where.options()) as api:
        return [await api.submit(t, params, **opts) for t, params, opts in jobs]


class _Never:
    async def execute(self, job: Job, ctx: Any) -> None:
        raise AssertionError("the submitting manager runs nothing")


async def read_jobs(where: Path | Backend) -> dict[str, Job]:
    """Read every job through a manager with no workers (it may recover leases)."""
    where = where if isinstance(where, Backend) else Backend(where)
    async with JobManager(worker_count=0, **where.options()) as reader:
        page = await reader.list(limit=1000)
        return {job.id: job for job in page.items}


def raw_lease(db: Path, job_id: str) -> float:
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT lease_expires_at FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
    return float(row[0])


async def run_until_idle(
    where: Path | Backend, options: dict[str, Any], restarts: int
) -> list[Child]:
    """Run ``until-idle`` children, restarting after each crash; return them all."""
    where = where if isinstance(where, Backend) else Backend(where)
    children = []
    for _ in range(restarts):
        child = await Child.start(where.db, "until-idle", where.child(options))
        code, err = await child.finish()
        children.append(child)
        if code == 0:
            return children
        assert code == 70, f"child died with {code}: {err[-2000:]}"
    raise AssertionError(f"still crashing after {restarts} restarts")


# ------------------------------------------------------------ issue 2 acceptance


async def test_sigkill_mid_job_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL mid-job; on restart it runs as attempt 2 once its lease ran out."""
    db = tmp_path / "jobs.db"
    hung, *waiting = await submit(
        db,
        ("work", {"hang_on": [1]}, {"max_retries": 1, "priority": 90}),
        ("work", {"n": 1}, {}),
        ("work", {"n": 2}, {}),
    )
    child = await Child.start(db, "forever", {**FAST, "worker_count": 1})
    assert (await child.line("started")).split()[1:] == [hung.id, "1"]
    await child.kill()
    lease_end = datetime.fromtimestamp(raw_lease(db, hung.id), UTC)

    registry = TaskRegistry()
    from tests.integration.crash_child import Work

    registry.add("work", Work())
    async with JobManager(
        db_path=db, registry=registry, worker_count=2, **FAST
    ) as restarted:
        done = await wait_for(restarted, hung.id, "done", timeout=30)
        others = [await wait_for(restarted, j.id, "done", timeout=30) for j in waiting]

    assert done.attempt == 2
    assert [e.code for e in done.errors] == ["worker_lost"]
    assert done.errors[0].attempt == 1
    assert done.started_at is not None and done.started_at >= lease_end
    assert done.assets is not None and done.assets.custom["attempt"] == 2
    assert done.assets.custom["pid"] == os.getpid()
    assert [(j.status, j.attempt) for j in others] == [("done", 1), ("done", 1)]


# ------------------------------------------------------------ B02


async def test_b02_recovery_of_a_killed_job_follows_its_retry_policy(
    backend: Backend,
) -> None:
    """max_retries 2: done on attempt 2; max_retries 0: failed worker_lost, run once."""
    retry, once = await submit(
        backend,
        ("work", {"exit_on": [1]}, {"max_retries": 2, "priority": 90}),
        ("work", {"exit_on": [1]}, {"max_retries": 0, "priority": 10}),
    )

    children = await run_until_idle(backend, {**FAST, "worker_count": 1}, restarts=6)

    starts = [s for child in children for s in child.starts()]
    jobs = await read_jobs(backend)
    assert jobs[retry.id].status == JobStatus.done
    assert jobs[retry.id].attempt == 2
    assert jobs[retry.id].assets is not None
    assert jobs[retry.id].assets.custom["ok"] is True
    failed = jobs[once.id]
    assert failed.status == JobStatus.failed
    assert failed.error is not None
    assert (failed.error.code, failed.error.type) == ("worker_lost", "WorkerLost")
    assert "stopped renewing its lease" in failed.error.message
    assert starts.count((once.id, 1)) == 1 and (once.id, 2) not in starts
    async with JobManager(worker_count=0, **backend.options()) as reader:
        assert [j.id for j in (await reader.list(status="done")).items] == [retry.id]
        assert [j.id for j in (await reader.list(status="failed")).items] == [once.id]


# ------------------------------------------------------------ B22 (c)


async def test_b22_a_job_that_kills_its_worker_stops_after_max_retries(
    backend: Backend,
) -> None:
    """Crashing every time with max_retries 2: failed after exactly 3 attempts."""
    poison, *fine = await submit(
        backend,
        ("work", {"exit_on": list(range(1, 20))}, {"max_retries": 2, "priority": 90}),
        ("work", {"n": 1}, {}),
        ("work", {"n": 2}, {}),
    )

    children = await run_until_idle(backend, {**FAST, "worker_count": 1}, restarts=8)
    again = await run_until_idle(backend, {**FAST, "worker_count": 1}, restarts=1)

    starts = [s for child in [*children, *again] for s in child.starts()]
    assert [a for job_id, a in starts if job_id == poison.id] == [1, 2, 3]
    jobs = await read_jobs(backend)
    final = jobs[poison.id]
    assert (final.status, final.attempt, final.retries) == ("failed", 3, 2)
    assert [e.code for e in final.errors] == ["worker_lost"] * 3
    assert all(jobs[j.id].status == JobStatus.done for j in fine)


# ------------------------------------------------------------ B04


async def _b04(backend: Backend, tmp_path: Path, rounds: int, slow_claim: bool) -> None:
    results = tmp_path / "results.db"
    rng = random.Random(4)
    submitted: list[str] = []
    options = backend.child({**FAST, "worker_count": 1, "slow_claim": slow_claim})
    for _ in range(rounds):
        (job,) = await submit(
            backend,
            ("work", {"results": str(results), "sleep": 0.02}, {"max_retries": 50}),
        )
        submitted.append(job.id)
        child = await Child.start(backend.db, "forever", options)
        await child.line("ready")
        await asyncio.sleep(rng.uniform(0, 0.1))  # the kill lands at a random point
        await child.kill()

    await run_until_idle(backend, {**FAST, "worker_count": 2}, restarts=1)

    jobs = await read_jobs(backend)
    assert sorted(jobs) == sorted(submitted)  # one record per submission
    assert {j.status for j in jobs.values()} == {JobStatus.done}
    with sqlite3.connect(results) as conn:
        rows = conn.execute("SELECT id, COUNT(*) FROM results GROUP BY id").fetchall()
    assert sorted(rows) == sorted((job_id, 1) for job_id in submitted)


@pytest.mark.parametrize("slow_claim", [False, True])
async def test_b04_kill_between_dequeue_and_running_orphans_nothing(
    backend: Backend, tmp_path: Path, slow_claim: bool
) -> None:
    """Workers SIGKILLed at random points: every job ends done exactly once."""
    await _b04(backend, tmp_path, rounds=6, slow_claim=slow_claim)


@pytest.mark.slow
async def test_b04_kill_between_dequeue_and_running_orphans_nothing_long(
    backend: Backend, tmp_path: Path
) -> None:
    """The 100-round variant, with the widened dequeue window."""
    await _b04(backend, tmp_path, rounds=100, slow_claim=True)


# ------------------------------------------------------------ B28


async def _b28(tmp_path: Path, jobs_per_process: int) -> None:
    from tests.integration.crash_child import registry as child_registry

    db = tmp_path / "jobs.db"
    async with JobManager(
        db_path=db,
        registry=child_registry(),
        worker_count=4,
        progress_interval_seconds=0,
    ) as here:
        child = await Child.start(
            db,
            "b28",
            {"worker_count": 4, "progress_interval_seconds": 0},
            env={"B28_JOBS": str(jobs_per_process)},
        )
        await child.line("ready")
        mine = await asyncio.gather(
            *(here.submit("chatty") for _ in range(jobs_per_process))
        )

        async def poll() -> None:
            for _ in range(jobs_per_process):
                await here.list(limit=20)
                await here.list(status="running", limit=20)

        await asyncio.gather(poll(), poll())
        finals = [await wait_for(here, j.id, timeout=60) for j in mine]
        summary = json.loads(
            (await child.line("summary", timeout=120)).split(" ", 1)[1]
        )
        code, err = await child.finish()
        health = await here.health()

    assert code == 0, err[-2000:]
    assert "database is locked" not in err
    assert summary["not_done"] == [] and summary["not_100"] == []
    assert all(j.status == JobStatus.done for j in finals)
    assert all(j.progress.percent == 100 for j in finals)
    assert health["ok"] is True
    jobs = await read_jobs(db)
    assert len(jobs) == 2 * jobs_per_process
    assert all(j.status == JobStatus.done for j in jobs.values())


async def test_b28_two_processes_tight_progress_no_database_locked(
    tmp_path: Path,
) -> None:
    """Two processes, 4 workers each, 50 progress writes per job: all done at 100.

    200 jobs in all, 100 of them submitted at once beside list polls.
    """
    await _b28(tmp_path, jobs_per_process=100)


@pytest.mark.slow
async def test_b28_two_processes_tight_progress_no_database_locked_long(
    tmp_path: Path,
) -> None:
    """The 2 x 400-job variant."""
    await _b28(tmp_path, jobs_per_process=400)


# ------------------------------------------------------------ B29


@pytest.mark.parametrize(
    "mode", ["b29-run", "b29-startup-fail", "b29-cancel", "b29-drop"]
)
async def test_b29_process_exits_cleanly_in_every_variant(
    backend: Backend, mode: str
) -> None:
    """Run, start-up failure, canceled store calls, dropped manager: exit code 0.

    On Redis the point is the same: no connection or task of the store or queue
    keeps the process from exiting.
    """
    child = await Child.start(backend.db, mode, backend.child())

    code, err = await child.finish(timeout=30)  # a hang shows up as a timeout

    assert code == 0, err[-2000:]
    threads = next(line for line in child.lines if line.startswith("threads"))
    parts = threads.split(" ", 3)
    if mode == "b29-drop":
        assert "was not closed" in err and "ResourceWarning" in err
    else:
        assert "_connection_worker_thread" not in parts[3], threads
    if mode == "b29-run":
        assert "job done" in child.lines


# ------------------------------------------------------------ B42


@pytest.mark.parametrize("tz", ["Asia/Kolkata", "America/Los_Angeles"])
async def test_b42_timestamps_are_utc_whatever_the_host_time_zone(
    backend: Backend, tz: str
) -> None:
    """Aware UTC timestamps, created_at near real now, kept across a retry."""
    before = time.time()
    child = await Child.start(backend.db, "b42", backend.child(), env={"TZ": tz})
    code, err = await child.finish()
    assert code == 0, err[-2000:]
    failed_line = next(line for line in child.lines if line.startswith("failed "))
    done_line = next(line for line in child.lines if line.startswith("done "))
    failed = json.loads(failed_line.split(" ", 1)[1])
    done = json.loads(done_line.split(" ", 1)[1])

    for job in (failed, done):
        for name in ("created_at", "started_at", "finished_at", "updated_at"):
            stamp = datetime.fromisoformat(job[name])
            assert (
                stamp.utcoffset() is not None and stamp.utcoffset().total_seconds() == 0
            )
    created = datetime.fromisoformat(done["created_at"])
    assert abs(created.timestamp() - before) < 2 + (time.time() - before)
    assert done["created_at"] == failed["created_at"]
    assert done["attempt"] == 2 and done["status"] == "done"
    started = datetime.fromisoformat(done["started_at"])
    finished = datetime.fromisoformat(done["finished_at"])
    assert created <= started <= finished
    assert datetime.fromisoformat(failed["finished_at"]) <= started
