"""Per-job overhead of process isolation against thread mode, and loop lag (#7).

Run: ``python bench/isolation_overhead.py [--jobs 500]``

Prints three figures:

1. runner call: one trivial sync job run the way the worker runs it, in a new
   thread, against ``ProcessRunner.execute`` in a warm child (no store, no
   queue): the pure cost of the pipe, JSON and the child's loop.
2. end to end: the same task through a JobManager (SQLite store, memory queue,
   one slot), submit to done, thread mode against process mode.
3. event-loop lag (case B11) while two tasks busy-loop: in child processes, and
   in threads (where they hold the GIL).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from backgrounder import Job, JobManager, RunContext, TaskRegistry
from backgrounder.isolation import ProcessRunner


class Trivial:
    """A sync task that does nothing."""

    def execute(self, job: Job, ctx: RunContext) -> None:
        return None


class Spin:
    """A sync task that burns CPU until canceled."""

    def execute(self, job: Job, ctx: RunContext) -> None:
        while not ctx.canceled:
            pass


def _job(index: int) -> Job:
    now = datetime.now(UTC)
    return Job(id=f"bench-{index}", task="trivial", created_at=now, updated_at=now)


async def _in_new_thread(runner: Any, job: Job, ctx: RunContext) -> Any:
    """Run a sync runner the way the worker does: a daemon thread per attempt."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[Any] = loop.create_future()

    def body() -> None:
        value = runner.execute(job, ctx)
        loop.call_soon_threadsafe(result.set_result, value)

    threading.Thread(target=body, daemon=True).start()
    return await result


async def runner_call(jobs: int, rounds: int = 10) -> tuple[float, float]:
    """Return µs per job: new thread, warm child process.

    The modes alternate in rounds and the median round counts, so a burst of
    load on the machine does not land on one mode only.
    """
    runner = Trivial()
    isolated = ProcessRunner(Trivial())
    per_round = max(1, jobs // rounds)
    thread_rounds: list[float] = []
    process_rounds: list[float] = []
    try:
        await isolated.prestart()
        for _ in range(rounds):
            started = time.perf_counter()
            for index in range(per_round):
                job = _job(index)
                await _in_new_thread(runner, job, RunContext(job))
            thread_rounds.append((time.perf_counter() - started) / per_round)
            started = time.perf_counter()
            for index in range(per_round):
                job = _job(index)
                await isolated.execute(job, RunContext(job))
            process_rounds.append((time.perf_counter() - started) / per_round)
    finally:
        await isolated.aclose()
    return statistics.median(thread_rounds) * 1e6, statistics.median(
        process_rounds
    ) * 1e6


async def _until(manager: JobManager, job_id: str, status: str) -> None:
    async for event in manager.events(job_id):
        if event.job.status == status:
            return
    raise RuntimeError(f"job {job_id} ended {event.job.status}, not {status}")


async def end_to_end(jobs: int, isolation: str | None, directory: Path) -> float:
    """Return µs per job, submit to done, through a manager with one slot."""
    registry = TaskRegistry()
    spec = registry.add("trivial", Trivial(), isolation=isolation)
    db = directory / f"{isolation or 'thread'}.db"
    async with JobManager(db_path=db, registry=registry, worker_count=1) as manager:
        if isinstance(spec.runner, ProcessRunner):
            await spec.runner.prestart()
        started = time.perf_counter()
        ids = [(await manager.submit("trivial")).id for _ in range(jobs)]
        for job_id in ids:
            await _until(manager, job_id, "done")
        elapsed = time.perf_counter() - started
    return elapsed / jobs * 1e6


async def loop_lag(isolation: str | None, directory: Path) -> list[float]:
    """Return how late (ms) 10 ms sleeps wake while two tasks busy-loop."""
    registry = TaskRegistry()
    spec = registry.add("spin", Spin(), isolation=isolation)
    db = directory / f"lag-{isolation or 'thread'}.db"
    manager = JobManager(
        db_path=db, registry=registry, worker_count=2, cancel_grace_seconds=1
    )
    late: list[float] = []
    async with manager:
        if isinstance(spec.runner, ProcessRunner):
            await spec.runner.prestart(children=2)
        spins = [(await manager.submit("spin")).id for _ in range(2)]
        for job_id in spins:
            await _until(manager, job_id, "running")
        for _ in range(200):
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            late.append((time.perf_counter() - before - 0.01) * 1000)
        for job_id in spins:
            await manager.cancel(job_id)
    return late


async def hard_timeout(directory: Path) -> tuple[float, bool]:
    """Return (finished_at - started_at, child gone) for a busy task, 1 s limit."""
    registry = TaskRegistry()
    spec = registry.add("spin", Spin(), isolation="process", timeout_seconds=1)
    db = directory / "timeout.db"
    async with JobManager(db_path=db, registry=registry, worker_count=1) as manager:
        assert isinstance(spec.runner, ProcessRunner)
        pids = await spec.runner.prestart()
        job = await manager.submit("spin")
        await _until(manager, job.id, "failed")
        failed = await manager.get(job.id)
        gone = not psutil.pid_exists(pids[0])
    assert failed.started_at is not None and failed.finished_at is not None
    return (failed.finished_at - failed.started_at).total_seconds(), gone


async def get_latency(isolation: str | None, directory: Path) -> list[float]:
    """Return GET /jobs/{id} latencies (ms) while two tasks busy-loop (B11)."""
    import httpx
    from fastapi import FastAPI

    from backgrounder import setup_backgrounder

    registry = TaskRegistry()
    spec = registry.add("spin", Spin(), isolation=isolation)
    app = FastAPI()
    manager = setup_backgrounder(
        app,
        db_path=directory / f"http-{isolation or 'thread'}.db",
        registry=registry,
        worker_count=2,
        cancel_grace_seconds=1,
    )
    latencies: list[float] = []
    await manager.start()
    try:
        if isinstance(spec.runner, ProcessRunner):
            await spec.runner.prestart(children=2)
        spins = [(await manager.submit("spin")).id for _ in range(2)]
        for job_id in spins:
            await _until(manager, job_id, "running")
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://b") as c:
            for _ in range(100):
                before = time.perf_counter()
                response = await c.get(f"/api/v1/jobs/{spins[0]}")
                latencies.append((time.perf_counter() - before) * 1000)
                assert response.status_code == 200
                await asyncio.sleep(0.01)
        for job_id in spins:
            await manager.cancel(job_id)
    finally:
        await manager.close()
    return latencies


def _summary(late: list[float]) -> str:
    ordered = sorted(late)
    p99 = ordered[int(len(ordered) * 0.99) - 1]
    return (
        f"p50 {statistics.median(ordered):6.2f} ms   p99 {p99:6.2f} ms   "
        f"max {ordered[-1]:6.2f} ms"
    )


async def main(jobs: int) -> None:
    """Measure and print every figure."""
    thread_us, process_us = await runner_call(jobs)
    print(f"runner call, {jobs} trivial jobs each (median of 10 alternating rounds)")
    print(f"  thread  (new thread per job) {thread_us:9.1f} µs/job")
    print(f"  process (warm child)         {process_us:9.1f} µs/job")
    print(f"  ratio process/thread         {process_us / thread_us:9.2f}x")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        thread_e2e = await end_to_end(jobs, None, directory)
        process_e2e = await end_to_end(jobs, "process", directory)
        print(f"end to end (SQLite store, memory queue, 1 slot), {jobs} jobs each")
        print(f"  thread                       {thread_e2e:9.1f} µs/job")
        print(f"  process                      {process_e2e:9.1f} µs/job")
        print(f"  ratio process/thread         {process_e2e / thread_e2e:9.2f}x")
        took, gone = await hard_timeout(directory)
        print("busy sync task, timeout_seconds=1, process mode (B11)")
        print(f"  finished_at - started_at       {took:7.2f} s; child gone: {gone}")
        print("event-loop lag of a 10 ms sleep while two tasks busy-loop (B11)")
        print(f"  in child processes  {_summary(await loop_lag('process', directory))}")
        print(f"  in threads (GIL)    {_summary(await loop_lag(None, directory))}")
        print("GET /jobs/{id} latency while two tasks busy-loop (B11)")
        print(
            f"  in child processes  {_summary(await get_latency('process', directory))}"
        )
        print(f"  in threads (GIL)    {_summary(await get_latency(None, directory))}")


if __name__ == "__main__":
    # The worker logs the timed-out job as an error; not news here.
    logging.getLogger("backgrounder").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500, help="jobs per mode")
    asyncio.run(main(parser.parse_args().jobs))
