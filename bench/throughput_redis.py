"""Throughput of Redis store + Redis queue: NoopRunner jobs through one worker process.

Starts ``backgrounder worker`` with 10 slots on a fresh key prefix, submits the jobs
from this process (a JobManager with no worker), and prints jobs per second from
the first submit to the last completion, and the worker's CPU time per job.

    python bench/throughput_redis.py [--jobs 10000] [--concurrency 10]
        [--redis-url redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
import redis.asyncio as aioredis

from backgrounder import JobManager, JobStatus, NoopRunner, TaskRegistry

ROOT = Path(__file__).resolve().parents[1]

registry = TaskRegistry()
registry.add("noop", NoopRunner(sleep_ms=0))


def start_worker(url: str, concurrency: int) -> subprocess.Popen[bytes]:
    """Start one ``backgrounder worker`` process (its output is discarded)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backgrounder.cli",
            "worker",
            "bench.throughput_redis:registry",
            "--store",
            url,
            "--queue",
            url,
            "--concurrency",
            str(concurrency),
            "--log-level",
            "WARNING",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


async def until(check: Callable[[], Awaitable[bool]], limit_s: float) -> None:
    """Poll ``check`` every 20 ms until it is true, for at most ``limit_s`` s."""
    async with asyncio.timeout(limit_s):
        while not await check():
            await asyncio.sleep(0.02)


async def run(
    worker: subprocess.Popen[bytes], url: str, redis_url: str, prefix: str, jobs: int
) -> None:
    admin = aioredis.Redis.from_url(redis_url)
    channel = f"{prefix}:q:cancel"

    async def worker_ready() -> bool:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with {worker.returncode}")
        # The worker subscribes to the cancel channel once it has started.
        subscribers = await admin.pubsub_numsub(channel)
        return bool(subscribers and subscribers[0][1])

    try:
        await until(worker_ready, 60)
        cpu = psutil.Process(worker.pid)
        manager = JobManager(store=url, queue=url, registry=registry, worker_count=0)
        async with manager:
            cpu_before = sum(cpu.cpu_times()[:2])
            start = time.perf_counter()
            batch = 100
            for first in range(0, jobs, batch):
                count = min(batch, jobs - first)
                await asyncio.gather(*[manager.submit("noop") for _ in range(count)])
            submitted = time.perf_counter()
            counts: dict[JobStatus, int] = {}

            async def all_ended() -> bool:
                counts.update(await manager.store.count_by_status())
                return counts[JobStatus.done] + counts[JobStatus.failed] >= jobs

            await until(all_ended, 900)
            end = time.perf_counter()
            cpu_after = sum(cpu.cpu_times()[:2])
        per_job_us = (cpu_after - cpu_before) / jobs * 1e6
        print(f"jobs: {jobs}, failed: {counts[JobStatus.failed]}")
        print(f"submit rate: {jobs / (submitted - start):,.0f} jobs/s")
        print(f"first submit to last completion: {jobs / (end - start):,.0f} jobs/s")
        print(f"worker CPU: {per_job_us:,.0f} us/job")
    finally:
        keys = [k async for k in admin.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(keys), 1000):
            await admin.delete(*keys[i : i + 1000])
        await admin.aclose()


def main(jobs: int, concurrency: int, redis_url: str) -> None:
    prefix = f"bench:{uuid.uuid4().hex[:10]}"
    url = f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={prefix}"
    print(
        f"Redis store + Redis queue at {redis_url}, one worker of {concurrency} slots"
    )
    worker = start_worker(url, concurrency)
    try:
        asyncio.run(run(worker, url, redis_url, prefix, jobs))
    finally:
        worker.terminate()
        worker.wait(30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BACKGROUNDER_REDIS_URL", "redis://127.0.0.1:6379/15"),
    )
    args = parser.parse_args()
    main(args.jobs, args.concurrency, args.redis_url)
