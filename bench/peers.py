"""Throughput of peer queues (arq, SAQ) on the same Redis, for side-by-side ratios.

Each system runs one worker process with 10 concurrent slots and the same
no-op task (an empty coroutine, as backgrounder's ``bench/tasks.py`` ``noop``).
The worker counts finished jobs in its own after-job hook (arq's
``after_job_end``, SAQ's ``after_process``, both called once the job's result is
recorded) and prints one line when the N-th has finished; the time is taken
from the first enqueue to that line, so counting adds no Redis round trip.
Worker CPU per job comes from the worker process's CPU times.

    python bench/peers.py arq --jobs 10000
    python bench/peers.py saq --jobs 10000

Needs the ``bench`` extra (arq, saq) and a Redis server (``--redis-url``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import psutil
import redis.asyncio as aioredis

DONE_LINE = "bench: all jobs finished"


# ------------------------------------------------------------------ workers


_finished = {"count": 0, "target": 0}


async def noop(ctx: dict[str, Any]) -> None:
    """The no-op task of every system."""
    return None


async def _count_one(ctx: Any) -> None:
    """After-job hook: count a finished job; say so once all have finished."""
    _finished["count"] += 1
    if _finished["count"] == _finished["target"]:
        sys.stdout.write(DONE_LINE + "\n")
        sys.stdout.flush()


def _arq_worker(url: str, run: str, concurrency: int, jobs: int) -> None:
    from arq.connections import RedisSettings
    from arq.worker import Worker

    _finished["target"] = jobs
    worker = Worker(
        functions=[noop],  # type: ignore[list-item]
        redis_settings=RedisSettings.from_dsn(url),
        queue_name=f"bench:arq:{run}",
        max_jobs=concurrency,
        poll_delay=0.005,
        keep_result=0,
        handle_signals=True,
        after_job_end=_count_one,
    )
    worker.run()


def _saq_worker(url: str, run: str, concurrency: int, jobs: int) -> None:
    from saq import Queue, Worker

    _finished["target"] = jobs

    async def main() -> None:
        queue = Queue.from_url(url, name=f"bench-saq-{run}")
        worker = Worker(
            queue, functions=[noop], concurrency=concurrency, after_process=_count_one
        )
        await worker.start()

    asyncio.run(main())


# ------------------------------------------------------------------ driver


async def _enqueue_arq(url: str, run: str, jobs: int) -> None:
    from arq import create_pool
    from arq.connections import RedisSettings

    pool = await create_pool(
        RedisSettings.from_dsn(url), default_queue_name=f"bench:arq:{run}"
    )
    for start in range(0, jobs, 500):
        await asyncio.gather(
            *(pool.enqueue_job("noop") for _ in range(min(500, jobs - start)))
        )
    await pool.aclose()


async def _enqueue_saq(url: str, run: str, jobs: int) -> None:
    from saq import Queue

    queue = Queue.from_url(url, name=f"bench-saq-{run}")
    await queue.connect()
    for start in range(0, jobs, 500):
        await asyncio.gather(
            *(queue.enqueue("noop") for _ in range(min(500, jobs - start)))
        )
    await queue.disconnect()


async def measure(
    system: str, url: str, jobs: int, concurrency: int = 10
) -> dict[str, Any]:
    """Run ``jobs`` no-op jobs through ``system``; return jobs/s and CPU per job."""
    run = uuid.uuid4().hex[:8]
    client = aioredis.Redis.from_url(url)
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "worker",
            system,
            "--redis-url",
            url,
            "--run",
            run,
            "--concurrency",
            str(concurrency),
            "--jobs",
            str(jobs),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    stdout = proc.stdout

    def finished() -> None:
        for line in stdout:
            if line.strip() == DONE_LINE:
                return
        raise RuntimeError(f"{system}: the worker exited before all jobs finished")

    try:
        await asyncio.sleep(2.0)  # let the worker connect and go idle
        worker = psutil.Process(proc.pid)
        cpu_before = sum(worker.cpu_times()[:2])
        started = time.perf_counter()
        enqueue = _enqueue_arq if system == "arq" else _enqueue_saq
        await enqueue(url, run, jobs)
        submitted = time.perf_counter()
        await asyncio.wait_for(asyncio.to_thread(finished), 600)
        elapsed = time.perf_counter() - started
        cpu = sum(worker.cpu_times()[:2]) - cpu_before
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        async for key in client.scan_iter(match=f"*{run}*"):
            await client.delete(key)
        await client.aclose()
    return {
        "system": system,
        "jobs": jobs,
        "seconds": round(elapsed, 3),
        "submit_seconds": round(submitted - started, 3),
        "jobs_per_second": round(jobs / elapsed, 1),
        "worker_cpu_us_per_job": round(cpu / jobs * 1e6, 1),
    }


def main() -> None:
    """Parse arguments; run a worker or a measurement."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("arq", "saq"):
        p = sub.add_parser(name)
        p.add_argument("--jobs", type=int, default=10_000)
        p.add_argument("--concurrency", type=int, default=10)
        p.add_argument(
            "--redis-url",
            default=os.environ.get(
                "BACKGROUNDER_REDIS_URL", "redis://127.0.0.1:6379/14"
            ),
        )
    w = sub.add_parser("worker")
    w.add_argument("system", choices=["arq", "saq"])
    w.add_argument("--redis-url", required=True)
    w.add_argument("--run", required=True)
    w.add_argument("--concurrency", type=int, default=10)
    w.add_argument("--jobs", type=int, required=True)
    args = parser.parse_args()
    if args.command == "worker":
        runner = _arq_worker if args.system == "arq" else _saq_worker
        runner(args.redis_url, args.run, args.concurrency, args.jobs)
        return
    result = asyncio.run(
        measure(args.command, args.redis_url, args.jobs, args.concurrency)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
