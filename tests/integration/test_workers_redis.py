"""Two ``backgrounder worker`` processes and an API on one real Redis.

Every job ends done exactly once; a SIGKILLed worker's job finishes on the other
worker as attempt 2; a SIGTERMed worker's job goes back uncharged. Needs
BACKGROUNDER_REDIS_URL.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from pydantic import BaseModel

from backgrounder import JobManager, JobStatus, TaskRegistry
from backgrounder.models import Job
from tests.integration.fixtures_tasks import registry as task_registry
from tests.integration.redis_tools import (
    REDIS_URL,
    WorkerProcess,
    delete_prefix,
    needs_redis,
    unique_prefix,
    with_prefix,
)

pytestmark = [needs_redis, pytest.mark.redis]

StartWorker = Callable[..., WorkerProcess]


class Submit(BaseModel):
    task: str
    params: dict[str, Any] = {}
    max_retries: int | None = None


def make_api(manager: JobManager) -> FastAPI:
    """A tiny API over the manager: POST /jobs and GET /jobs/{id}."""
    api = FastAPI()

    @api.post("/jobs", status_code=201)
    async def submit(body: Submit) -> Job:
        return await manager.submit(
            body.task, body.params, max_retries=body.max_retries
        )

    @api.get("/jobs/{job_id}")
    async def get(job_id: str) -> Job:
        return await manager.get(job_id)

    return api


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    value = unique_prefix()
    yield value
    assert REDIS_URL
    await delete_prefix(REDIS_URL, value)


@pytest.fixture
def store_url(request: pytest.FixtureRequest, prefix: str, tmp_path: Path) -> str:
    """The store every process shares: Redis (default) or a SQLite file.

    Parametrize indirectly with "sqlite" for the mixed pair (SQLite store,
    Redis queue).
    """
    assert REDIS_URL
    if getattr(request, "param", "redis") == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return with_prefix(REDIS_URL, prefix)


@pytest.fixture
async def manager(prefix: str, store_url: str) -> AsyncIterator[JobManager]:
    """The API side: the shared store, the Redis queue, no worker of its own."""
    assert REDIS_URL
    url = with_prefix(REDIS_URL, prefix)
    registry = TaskRegistry()
    for name in ("count", "hold"):
        spec = task_registry.get(name)
        assert spec is not None
        registry.add(name, spec.runner, max_retries=spec.max_retries)
    async with JobManager(
        store=store_url, queue=url, registry=registry, worker_count=0, lease_seconds=2
    ) as built:
        yield built


@pytest.fixture
async def http(manager: JobManager) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_api(manager))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
        yield c


@pytest.fixture
def start_worker(
    prefix: str, tmp_path: Path, store_url: str
) -> AsyncIterator[StartWorker] | Any:
    assert REDIS_URL
    url = with_prefix(REDIS_URL, prefix)
    env = dict(os.environ, BG_TEST_REDIS_URL=REDIS_URL, BG_TEST_PREFIX=prefix)
    workers: list[WorkerProcess] = []

    def start(*extra: str, concurrency: int = 8) -> WorkerProcess:
        args = [
            "tests.integration.fixtures_tasks:registry",
            "--store",
            store_url,
            "--queue",
            url,
            "--concurrency",
            str(concurrency),
            "--lease-seconds",
            "2",
            "--retry-backoff-seconds",
            "0.05",
            "--retry-backoff-max-seconds",
            "0.1",
            *extra,
        ]
        worker = WorkerProcess(tmp_path / f"worker{len(workers)}.log", args, env)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


async def runs_of(prefix: str, job_id: str) -> list[str]:
    assert REDIS_URL
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        runs = await client.lrange(f"{prefix}:runs:{job_id}:attempts", 0, -1)
        return [str(run) for run in runs]
    finally:
        await client.aclose()


async def wait_status(
    manager: JobManager, job_id: str, status: JobStatus, timeout: float = 30.0
) -> Job:
    """Poll the store (bounded) until the job is in ``status``."""
    async with asyncio.timeout(timeout):
        while (job := await manager.get(job_id)).status != status:
            await asyncio.sleep(0.05)
    return job


async def wait_runs(
    prefix: str, job_id: str, count: int, timeout: float = 30.0
) -> None:
    """Poll (bounded) until the job's runner has begun ``count`` executions."""
    async with asyncio.timeout(timeout):
        while len(await runs_of(prefix, job_id)) < count:
            await asyncio.sleep(0.05)


def pid_of(job: Job) -> int:
    assert job.worker_id is not None
    return int(job.worker_id.split(":")[1])


async def test_every_job_ends_done_exactly_once(
    manager: JobManager,
    http: httpx.AsyncClient,
    start_worker: StartWorker,
    prefix: str,
) -> None:
    workers = [start_worker(), start_worker()]
    for worker in workers:
        await worker.wait_started()
    ids = []
    for i in range(300):
        response = await http.post(
            "/jobs", json={"task": "count", "params": {"i": i, "ms": 5}}
        )
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    async with asyncio.timeout(120):
        while (await manager.store.count_by_status())[JobStatus.done] < len(ids):
            await asyncio.sleep(0.1)
    counts = await manager.store.count_by_status()
    assert counts[JobStatus.done] == 300 and counts[JobStatus.failed] == 0
    pids = set()
    for job_id in ids:
        job = (await http.get(f"/jobs/{job_id}")).json()
        assert job["status"] == "done" and job["attempt"] == 1
        runs = await runs_of(prefix, job_id)
        assert len(runs) == 1, (job_id, runs)
        pids.add(int(runs[0].split("|")[1].split(":")[1]))
    assert pids == {w.pid for w in workers}
    assert await manager.queue.size() == 0


async def test_sigkill_mid_job_finishes_on_the_other_worker_as_attempt_2(
    manager: JobManager,
    http: httpx.AsyncClient,
    start_worker: StartWorker,
    prefix: str,
) -> None:
    workers = {w.pid: w for w in (start_worker(), start_worker())}
    for worker in workers.values():
        await worker.wait_started()
    response = await http.post(
        "/jobs", json={"task": "hold", "params": {"seconds": 60}, "max_retries": 1}
    )
    job_id = response.json()["id"]
    await wait_runs(prefix, job_id, 1)
    running = await wait_status(manager, job_id, JobStatus.running)
    victim = pid_of(running)
    workers[victim].signal(signal.SIGKILL)
    assert await workers[victim].wait_exit() == -signal.SIGKILL
    done = await wait_status(manager, job_id, JobStatus.done)
    assert done.attempt == 2
    assert [e.code for e in done.errors] == ["worker_lost"]
    runs = await runs_of(prefix, job_id)
    assert [r.split("|")[0] for r in runs] == ["1", "2"]
    survivor = next(pid for pid in workers if pid != victim)
    assert pid_of(done) == survivor


async def test_b35_sigterm_mid_job_returns_it_uncharged(
    manager: JobManager,
    http: httpx.AsyncClient,
    start_worker: StartWorker,
    prefix: str,
) -> None:
    first = start_worker("--shutdown-grace-seconds", "0.5")
    await first.wait_started()
    response = await http.post(
        "/jobs", json={"task": "hold", "params": {"seconds": 60}, "max_retries": 1}
    )
    job_id = response.json()["id"]
    await wait_runs(prefix, job_id, 1)
    running = await wait_status(manager, job_id, JobStatus.running)
    assert pid_of(running) == first.pid
    # A second worker comes up only now, so the job could only have started on the
    # first one; it must take the job over once the first gives it back.
    second = start_worker()
    await second.wait_started()
    first.signal(signal.SIGTERM)
    assert await first.wait_exit() == 0
    assert "no attempt charged" in first.text()
    done = await wait_status(manager, job_id, JobStatus.done)
    assert done.attempt == 1 and done.retries == 0 and done.errors == []
    assert pid_of(done) == second.pid
    runs = await runs_of(prefix, job_id)
    assert [r.split("|")[0] for r in runs] == ["1", "1"]


@pytest.mark.parametrize(
    "store_url", ["redis", "sqlite"], indirect=True, ids=["redis+redis", "sqlite+redis"]
)
async def test_sigkill_loop_loses_and_duplicates_nothing(
    manager: JobManager,
    http: httpx.AsyncClient,
    start_worker: StartWorker,
    prefix: str,
    store_url: str,
) -> None:
    """Workers SIGKILLed mid-job over and over: every job ends, once per attempt.

    On Redis store + Redis queue, and on a SQLite file shared by the processes
    with the Redis queue (the mixed pair).

    Three ``backgrounder worker`` processes run 120 jobs of 150-300 ms; six times
    a worker holding a running job is killed and a new one started. Each runner
    records (attempt, worker) in Redis. At the end every job is terminal, no
    attempt of any job ran twice, and every done job's final attempt ran.
    """
    workers = [start_worker(concurrency=4) for _ in range(3)]
    for worker in workers:
        await worker.wait_started()
    ids = []
    for i in range(120):
        response = await http.post(
            "/jobs", json={"task": "count", "params": {"i": i, "ms": 150 + i % 151}}
        )
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    kills = 0
    async with asyncio.timeout(60):
        while kills < 6:
            running = (await manager.list(status="running", limit=50)).items
            alive = {w.pid: w for w in workers if w.process.poll() is None}
            victims = [pid_of(job) for job in running if pid_of(job) in alive]
            if not victims:
                if not (await manager.list(status="queued", limit=1)).items:
                    break  # nothing left to interrupt
                await asyncio.sleep(0.02)
                continue
            alive[victims[0]].signal(signal.SIGKILL)
            await alive[victims[0]].wait_exit()
            kills += 1
            replacement = start_worker(concurrency=4)
            workers.append(replacement)
    assert kills >= 1
    terminal = (JobStatus.done, JobStatus.failed, JobStatus.canceled)
    async with asyncio.timeout(90):
        while True:
            counts = await manager.store.count_by_status()
            if sum(counts[s] for s in terminal) == len(ids):
                break
            await asyncio.sleep(0.1)
    twice = 0
    for job_id in ids:
        job = await manager.get(job_id)
        runs = await runs_of(prefix, job_id)
        attempts = [int(run.split("|")[0]) for run in runs]
        twice += len(attempts) - len(set(attempts))
        if job.status == JobStatus.done:
            assert job.attempt in attempts, (job_id, runs)
        else:  # a job killed on every attempt ends worker_lost, never silently
            assert job.status == JobStatus.failed, job
            assert job.error is not None and job.error.code == "worker_lost"
    print(
        f"\nSIGKILL loop ({manager.store.name}+{manager.queue.name}): "
        f"{len(ids)} jobs, {kills} kills, "
        f"{counts[JobStatus.done]} done, {counts[JobStatus.failed]} failed, "
        f"lost 0, attempts run twice {twice}"
    )
    assert twice == 0
    assert await manager.queue.size() == 0
