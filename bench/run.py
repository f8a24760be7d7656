"""All benchmarks in one run: a table on stdout, JSON in bench/results.

    python bench/run.py [--quick] [--jobs 10000] [--skip peers,http,...]

Sections (each can be skipped by name):

- ``embedded``: N no-op jobs through SQLite store + memory queue, 10 slots, in process.
- ``sqlite_redis``: the same through SQLite store + Redis queue, in process.
- ``redis``: Redis store + Redis queue, one ``backgrounder worker`` subprocess of 10
  slots; jobs/s, worker CPU µs per job, and the worker's RSS before and after
  ``--rss-jobs`` jobs.
- ``peers``: arq and SAQ through bench/peers.py on the same Redis (run with
  ``--peers-python``, a Python where arq and saq are installed), and the ratios.
- ``pickup``: one job at a time onto an idle worker, submit → execute start: in
  process (memory and Redis) and onto a ``backgrounder worker`` process (Redis).
- ``http``: POST /jobs requests/s under uvicorn beside a bare endpoint.
- ``progress``: µs per ``ctx.progress`` call in a tight loop, store writes/s.
- ``scale``: ``get`` and ``list`` latency with 1,000 and ``--scale`` jobs stored.

Numbers are wall-clock figures of a shared machine: compare figures of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import redis.asyncio as aioredis
from tasks import Empty  # bench/tasks.py: this script runs from bench/

from backgrounder import Job, JobManager, JobStatus, TaskRegistry
from backgrounder.store.sqlite import _COLUMNS, SqliteStore

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _noop_registry() -> TaskRegistry:
    registry = TaskRegistry()
    registry.add("noop", Empty())
    return registry


def _redis_url(base: str, prefix: str) -> str:
    return f"{base}{'&' if '?' in base else '?'}prefix={prefix}"


async def _until(check: Callable[[], Awaitable[bool]], limit_s: float) -> None:
    async with asyncio.timeout(limit_s):
        while not await check():
            await asyncio.sleep(0.01)


async def _drop_prefix(redis_url: str, prefix: str) -> None:
    admin = aioredis.Redis.from_url(redis_url)
    keys = [k async for k in admin.scan_iter(match=f"{prefix}:*", count=1000)]
    for i in range(0, len(keys), 1000):
        await admin.delete(*keys[i : i + 1000])
    await admin.aclose()


async def _submit_all(manager: JobManager, jobs: int, batch: int = 100) -> None:
    for first in range(0, jobs, batch):
        count = min(batch, jobs - first)
        await asyncio.gather(*[manager.submit("noop") for _ in range(count)])


async def _all_ended(manager: JobManager, jobs: int) -> dict[JobStatus, int]:
    counts: dict[JobStatus, int] = {}

    async def ended() -> bool:
        counts.update(await manager.store.count_by_status())
        return counts[JobStatus.done] + counts[JobStatus.failed] >= jobs

    await _until(ended, 1800)
    return counts


# ------------------------------------------------------------------ throughput


async def bench_in_process(jobs: int, queue: str | None, db: Path) -> dict[str, Any]:
    """N no-op jobs through an in-process manager of 10 slots."""
    me = psutil.Process()
    manager = JobManager(
        db_path=db, queue=queue, registry=_noop_registry(), worker_count=10
    )
    async with manager:
        cpu0 = sum(me.cpu_times()[:2])
        started = time.perf_counter()
        await _submit_all(manager, jobs)
        submitted = time.perf_counter()
        counts = await _all_ended(manager, jobs)
        ended = time.perf_counter()
        cpu = sum(me.cpu_times()[:2]) - cpu0
    # Every job durable: the rows are read back from the file after close.
    with sqlite3.connect(db) as conn:
        (durable,) = conn.execute(
            "SELECT count(*) FROM jobs WHERE status = 'done'"
        ).fetchone()
    return {
        "jobs": jobs,
        "failed": counts[JobStatus.failed],
        "done_in_sqlite_file": durable,
        "submit_per_second": round(jobs / (submitted - started), 1),
        "jobs_per_second": round(jobs / (ended - started), 1),
        "process_cpu_us_per_job": round(cpu / jobs * 1e6, 1),
    }


def _start_redis_worker(url: str, concurrency: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backgrounder.cli",
            "worker",
            "bench.tasks:registry",
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


@contextlib.asynccontextmanager
async def _redis_worker(redis_url: str) -> AsyncIterator[tuple[str, psutil.Process]]:
    """Start a ``backgrounder worker`` of 10 slots on a fresh prefix, wait until it
    listens, and yield its URL and process; stop it and drop its keys after."""
    prefix = f"bench:{uuid.uuid4().hex[:10]}"
    url = _redis_url(redis_url, prefix)
    worker = _start_redis_worker(url, 10)
    admin = aioredis.Redis.from_url(redis_url)
    try:

        async def ready() -> bool:
            if worker.poll() is not None:
                raise SystemExit(f"the worker exited with {worker.returncode}")
            subscribers = await admin.pubsub_numsub(f"{prefix}:q:cancel")
            return bool(subscribers and subscribers[0][1])

        await _until(ready, 60)
        yield url, psutil.Process(worker.pid)
    finally:
        worker.terminate()
        worker.wait(30)
        await admin.aclose()
        await _drop_prefix(redis_url, prefix)


async def bench_redis(jobs: int, rss_jobs: int, redis_url: str) -> dict[str, Any]:
    """Redis store + queue, one worker subprocess of 10 slots; CPU and RSS."""
    async with _redis_worker(redis_url) as (url, proc):
        manager = JobManager(
            store=url, queue=url, registry=_noop_registry(), worker_count=0
        )
        async with manager:
            warm = 1000
            await _submit_all(manager, warm)
            await _all_ended(manager, warm)
            rss0 = proc.memory_info().rss
            cpu0 = sum(proc.cpu_times()[:2])
            started = time.perf_counter()
            await _submit_all(manager, jobs)
            await _all_ended(manager, warm + jobs)
            elapsed = time.perf_counter() - started
            cpu = sum(proc.cpu_times()[:2]) - cpu0
            done = jobs
            rss_points = [(0, rss0), (done, proc.memory_info().rss)]
            while done < rss_jobs:
                step = min(10_000, rss_jobs - done)
                await _submit_all(manager, step)
                done += step
                await _all_ended(manager, warm + done)
                rss_points.append((done, proc.memory_info().rss))
    rss1 = rss_points[-1][1]
    return {
        "jobs": jobs,
        "jobs_per_second": round(jobs / elapsed, 1),
        "worker_cpu_us_per_job": round(cpu / jobs * 1e6, 1),
        "rss_jobs": rss_points[-1][0],
        "rss_before_mb": round(rss0 / 2**20, 1),
        "rss_after_mb": round(rss1 / 2**20, 1),
        "rss_change_percent": round((rss1 - rss0) / rss0 * 100, 1),
        "rss_points_mb": [(n, round(r / 2**20, 1)) for n, r in rss_points],
    }


def bench_peer(system: str, jobs: int, redis_url: str, python: str) -> dict[str, Any]:
    """arq or SAQ through bench/peers.py in ``python``."""
    out = subprocess.run(
        [
            python,
            str(HERE / "peers.py"),
            system,
            "--jobs",
            str(jobs),
            "--redis-url",
            redis_url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------ pickup


class _StampRunner:
    """Records when execute starts, keyed by job id."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.event = asyncio.Event()

    async def execute(self, job: Job, ctx: Any) -> None:
        self.started[job.id] = time.perf_counter()
        self.event.set()


async def bench_pickup(samples: int, store: Any, queue: str | None) -> dict[str, Any]:
    """One job at a time onto an idle worker of 10 slots."""
    runner = _StampRunner()
    registry = TaskRegistry()
    registry.add("stamp", runner)
    kwargs: dict[str, Any] = (
        {"db_path": store} if isinstance(store, Path) else {"store": store}
    )
    latencies: list[float] = []
    async with JobManager(
        queue=queue, registry=registry, worker_count=10, **kwargs
    ) as manager:
        for i in range(samples + 10):
            await asyncio.sleep(0.01)  # the worker goes idle, waiting on the queue
            runner.event.clear()
            t0 = time.perf_counter()
            job = await manager.submit("stamp")
            async with asyncio.timeout(30):
                await runner.event.wait()
            if i >= 10:  # the first ones warm up
                latencies.append(runner.started[job.id] - t0)
            async for event in manager.events(job.id):
                if event.job.is_terminal:
                    break
    return {
        "samples": samples,
        "p50_ms": _ms(_pct(latencies, 0.5)),
        "p99_ms": _ms(_pct(latencies, 0.99)),
        "max_ms": _ms(max(latencies)),
    }


async def bench_pickup_process(samples: int, redis_url: str) -> dict[str, Any]:
    """One job at a time onto an idle ``backgrounder worker`` process (10 slots).

    The worker's task returns the wall-clock time its execute started; both
    processes read the same system clock. Each job is submitted 15 ms after the
    one before, long after that one ended, so the worker is idle each time.
    """
    async with _redis_worker(redis_url) as (url, _):
        registry = TaskRegistry()
        registry.add("stamp", _StampRunner())  # known here; runs in the worker
        async with JobManager(
            store=url, queue=url, registry=registry, worker_count=0
        ) as manager:
            sent: list[tuple[str, float]] = []
            for _ in range(samples + 10):
                await asyncio.sleep(0.015)
                t0 = time.time()
                job = await manager.submit("stamp")
                sent.append((job.id, t0))
            await _until(lambda: _ended_count(manager, len(sent)), 60)
            jobs = await manager.store.get_many([job_id for job_id, _ in sent])
    latencies = []
    for job, (_, t0) in list(zip(jobs, sent, strict=True))[10:]:
        assert job is not None and job.assets is not None and job.assets.custom
        latencies.append(float(job.assets.custom["started"]) - t0)
    return {
        "samples": samples,
        "p50_ms": _ms(_pct(latencies, 0.5)),
        "p99_ms": _ms(_pct(latencies, 0.99)),
        "max_ms": _ms(max(latencies)),
    }


async def _ended_count(manager: JobManager, jobs: int) -> bool:
    counts = await manager.store.count_by_status()
    return counts[JobStatus.done] + counts[JobStatus.failed] >= jobs


# ------------------------------------------------------------------ http


async def _hammer(url: str, body: dict[str, Any], seconds: float, conc: int) -> float:
    import httpx

    count = 0
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=30) as client:

        async def loop() -> None:
            nonlocal count
            while time.perf_counter() < stop:
                response = await client.post(url, json=body)
                response.raise_for_status()
                count += 1

        started = time.perf_counter()
        await asyncio.gather(*[loop() for _ in range(conc)])
        return count / (time.perf_counter() - started)


async def bench_http(seconds: float, folder: Path) -> dict[str, Any]:
    """POST /jobs beside a bare endpoint, one uvicorn process."""
    port = 18000 + random.randrange(1000)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.http_app:app",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), BENCH_DB=str(folder / "http.db")),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        async with asyncio.timeout(60):
            while True:
                try:
                    async with httpx.AsyncClient() as c:
                        await c.post(f"{base}/bare")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
        await _hammer(f"{base}/bare", {}, 1.0, 10)  # warm up
        bare = await _hammer(f"{base}/bare", {}, seconds, 10)
        submit = await _hammer(f"{base}/api/v1/jobs", {"task": "noop"}, seconds, 10)
    finally:
        server.terminate()
        server.wait(30)
    return {
        "bare_rps": round(bare, 1),
        "submit_rps": round(submit, 1),
        "ratio": round(submit / bare, 2),
    }


# ------------------------------------------------------------------ progress


async def bench_progress(calls: int, db: Path) -> dict[str, Any]:
    """µs per ctx.progress in a tight loop; store writes it causes."""
    timing: dict[str, float] = {}

    class Tight:
        async def execute(self, job: Job, ctx: Any) -> None:
            started = time.perf_counter()
            for i in range(calls):
                await ctx.progress(i * 100 / calls, "infer", i, calls)
            timing["seconds"] = time.perf_counter() - started

    registry = TaskRegistry()
    registry.add("tight", Tight())
    async with JobManager(db_path=db, registry=registry, worker_count=1) as manager:
        writes = 0
        update = manager.store.update

        async def counting(job_id: str, fields: dict[str, Any], **kw: Any) -> Any:
            nonlocal writes
            if "progress" in fields:
                writes += 1
            return await update(job_id, fields, **kw)

        manager.store.update = counting  # type: ignore[method-assign]
        job = await manager.submit("tight")

        async def ended() -> bool:
            return (await manager.store.get(job.id)).is_terminal  # type: ignore[union-attr]

        # Polled, not streamed: a subscriber would get every call as an event.
        await _until(ended, 600)
    seconds = timing["seconds"]
    return {
        "calls": calls,
        "us_per_call": round(seconds / calls * 1e6, 2),
        "store_writes": writes,
        "store_writes_per_second": round(writes / seconds, 1),
    }


# ------------------------------------------------------------------ scale


async def _time_reads(store: Any, ids: list[str], samples: int) -> dict[str, float]:
    gets: list[float] = []
    for job_id in random.sample(ids, min(samples, len(ids))):
        t0 = time.perf_counter()
        assert await store.get(job_id) is not None
        gets.append(time.perf_counter() - t0)
    lists: list[float] = []
    filtered: list[float] = []
    for _ in range(50):
        t0 = time.perf_counter()
        page = await store.list(limit=50)
        lists.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await store.list(
            status=JobStatus.done, task="noop", limit=50, cursor=page.next_cursor
        )
        filtered.append(time.perf_counter() - t0)
    return {
        "get_p50_us": round(statistics.median(gets) * 1e6, 1),
        "list50_p50_us": round(statistics.median(lists) * 1e6, 1),
        "list50_filtered_p50_us": round(statistics.median(filtered) * 1e6, 1),
    }


async def bench_scale_sqlite(count: int, folder: Path) -> dict[str, Any]:
    """Fill SQLite with ``count`` copies of a done job in one INSERT, then read."""
    db = folder / f"scale-{count}.db"
    async with JobManager(db_path=db, registry=_noop_registry(), worker_count=1) as m:
        template = await m.submit("noop")
        async for event in m.events(template.id):
            if event.job.is_terminal:
                break
    columns = [c for c in _COLUMNS if c != "id"]
    with sqlite3.connect(db) as conn:
        conn.execute(
            f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
            f"WHERE x < ?) INSERT INTO jobs (id, {', '.join(columns)}) "
            f"SELECT printf('bulk-%09d', x), {', '.join(columns)} FROM c, "
            f"(SELECT * FROM jobs WHERE id = ?)",
            (count - 1, template.id),
        )
    store = SqliteStore(db)
    from backgrounder.clock import SystemClock

    await store.open(SystemClock())
    try:
        ids = [f"bulk-{random.randrange(1, count):09d}" for _ in range(200)]
        return {"jobs": count, **await _time_reads(store, ids, 200)}
    finally:
        await store.close()


async def bench_scale_redis(count: int, redis_url: str) -> dict[str, Any]:
    """Fill a Redis store with ``count`` jobs through ``create``, then read."""
    prefix = f"bench:{uuid.uuid4().hex[:10]}"
    url = _redis_url(redis_url, prefix)
    manager = JobManager(
        store=url, queue=url, registry=_noop_registry(), worker_count=0
    )
    try:
        async with manager:
            template = await manager.submit("noop")
            ids: list[str] = []
            started = time.perf_counter()
            for first in range(0, count, 500):
                batch = [
                    template.model_copy(
                        update={"id": uuid.uuid4().hex, "status": JobStatus.done}
                    )
                    for _ in range(min(500, count - first))
                ]
                await asyncio.gather(*[manager.store.create(j) for j in batch])
                ids += [j.id for j in batch]
            fill = time.perf_counter() - started
            reads = await _time_reads(manager.store, ids, 200)
    finally:
        await _drop_prefix(redis_url, prefix)
    return {"jobs": count, "fill_seconds": round(fill, 1), **reads}


# ------------------------------------------------------------------ main


def _peers_python(given: str | None) -> str | None:
    if given:
        return given
    for candidate in ("/tmp/benchvenv/bin/python", sys.executable):
        if not Path(candidate).exists():
            continue
        probe = subprocess.run(
            [candidate, "-c", "import arq, saq"], capture_output=True, check=False
        )
        if probe.returncode == 0:
            return candidate
    return None


def _row(name: str, value: Any, note: str = "") -> None:
    print(f"  {name:<46} {value!s:>14}  {note}")


def _print(results: dict[str, Any]) -> None:
    print(f"\nbackgrounder benchmarks, {results['machine']}")
    s = results["sections"]
    if "embedded" in s:
        e = s["embedded"]
        print("throughput (no-op jobs, 10 slots)")
        _row(
            "embedded SQLite + memory, jobs/s",
            e["jobs_per_second"],
            f"{e['process_cpu_us_per_job']} µs CPU/job (whole process)",
        )
    if "sqlite_redis" in s:
        e = s["sqlite_redis"]
        _row(
            "SQLite store + Redis queue, jobs/s",
            e["jobs_per_second"],
            f"{e['process_cpu_us_per_job']} µs CPU/job (whole process)",
        )
    if "redis" in s:
        r = s["redis"]
        _row(
            "Redis + Redis, 1 worker process, jobs/s",
            r["jobs_per_second"],
            f"{r['worker_cpu_us_per_job']} µs worker CPU/job",
        )
    for peer in ("arq", "saq"):
        if peer in s:
            p = s[peer]
            ratio = s.get("ratios", {}).get(f"redis/{peer}")
            _row(
                f"{peer}, 1 worker process, jobs/s",
                p["jobs_per_second"],
                f"{p['worker_cpu_us_per_job']} µs worker CPU/job; "
                f"backgrounder/{peer} = {ratio}",
            )
    for name in ("pickup_memory", "pickup_redis", "pickup_redis_worker"):
        if name in s:
            p = s[name]
            _row(
                f"{name.replace('_', ' ')} p50 / p99 ms",
                f"{p['p50_ms']} / {p['p99_ms']}",
                f"{p['samples']} jobs",
            )
    if "http" in s:
        h = s["http"]
        _row(
            "HTTP POST /jobs req/s (bare endpoint)",
            f"{h['submit_rps']} ({h['bare_rps']})",
            f"ratio {h['ratio']}",
        )
    if "progress" in s:
        p = s["progress"]
        _row(
            "ctx.progress µs/call",
            p["us_per_call"],
            f"{p['store_writes']} store writes, {p['store_writes_per_second']}/s",
        )
    for key, value in s.items():
        if key.startswith("scale_"):
            _row(
                f"{key} get / list50 / filtered µs",
                f"{value['get_p50_us']} / {value['list50_p50_us']} / "
                f"{value['list50_filtered_p50_us']}",
                f"{value['jobs']:,} jobs",
            )
    if "redis" in s:
        r = s["redis"]
        _row(
            "worker RSS MB before / after",
            f"{r['rss_before_mb']} / {r['rss_after_mb']}",
            f"{r['rss_change_percent']} % over {r['rss_jobs']:,} jobs",
        )


async def _run(args: argparse.Namespace, results: dict[str, Any]) -> None:
    s = results["sections"]
    skip = set(args.skip.split(",")) if args.skip else set()

    def want(name: str) -> bool:
        return name not in skip

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prefix = f"bench:{uuid.uuid4().hex[:10]}"
        if want("embedded"):
            s["embedded"] = await bench_in_process(args.jobs, None, folder / "e.db")
            print("embedded", s["embedded"], flush=True)
        if want("sqlite_redis"):
            try:
                s["sqlite_redis"] = await bench_in_process(
                    args.jobs, _redis_url(args.redis_url, prefix), folder / "sr.db"
                )
            finally:
                await _drop_prefix(args.redis_url, prefix)
            print("sqlite_redis", s["sqlite_redis"], flush=True)
        if want("redis"):
            s["redis"] = await bench_redis(args.jobs, args.rss_jobs, args.redis_url)
            print("redis", s["redis"], flush=True)
        if want("peers"):
            python = _peers_python(args.peers_python)
            if python is None:
                print("peers skipped: no Python with arq and saq (--peers-python)")
            else:
                for peer in ("arq", "saq"):
                    s[peer] = bench_peer(peer, args.jobs, args.redis_url, python)
                    print(peer, s[peer], flush=True)
                    if "redis" in s:
                        s.setdefault("ratios", {})[f"redis/{peer}"] = round(
                            s["redis"]["jobs_per_second"] / s[peer]["jobs_per_second"],
                            2,
                        )
        if want("pickup"):
            s["pickup_memory"] = await bench_pickup(args.pickup, folder / "p.db", None)
            print("pickup_memory", s["pickup_memory"], flush=True)
            p2 = f"bench:{uuid.uuid4().hex[:10]}"
            url = _redis_url(args.redis_url, p2)
            try:
                s["pickup_redis"] = await bench_pickup(args.pickup, url, url)
            finally:
                await _drop_prefix(args.redis_url, p2)
            print("pickup_redis", s["pickup_redis"], flush=True)
            s["pickup_redis_worker"] = await bench_pickup_process(
                args.pickup, args.redis_url
            )
            print("pickup_redis_worker", s["pickup_redis_worker"], flush=True)
        if want("http"):
            s["http"] = await bench_http(args.http_seconds, folder)
            print("http", s["http"], flush=True)
        if want("progress"):
            s["progress"] = await bench_progress(args.progress_calls, folder / "g.db")
            print("progress", s["progress"], flush=True)
        if want("scale"):
            for count in sorted({1000, args.scale}):
                key = f"scale_sqlite_{count}"
                s[key] = await bench_scale_sqlite(count, folder)
                print(key, s[key], flush=True)
            for count in sorted({1000, args.redis_scale}):
                key = f"scale_redis_{count}"
                s[key] = await bench_scale_redis(count, args.redis_url)
                print(key, s[key], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, ~2 min")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--rss-jobs", type=int, default=None)
    parser.add_argument("--pickup", type=int, default=None)
    parser.add_argument("--progress-calls", type=int, default=None)
    parser.add_argument("--http-seconds", type=float, default=None)
    parser.add_argument("--scale", type=int, default=None)
    parser.add_argument("--redis-scale", type=int, default=None)
    parser.add_argument("--skip", default="", help="comma-separated section names")
    parser.add_argument("--peers-python", default=None)
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BACKGROUNDER_REDIS_URL", "redis://127.0.0.1:6379/14"),
    )
    args = parser.parse_args()
    quick = {
        "jobs": 2000,
        "rss_jobs": 2000,
        "pickup": 200,
        "progress_calls": 20_000,
        "http_seconds": 3.0,
        "scale": 100_000,
        "redis_scale": 5000,
    }
    full = {
        "jobs": 10_000,
        "rss_jobs": 100_000,
        "pickup": 500,
        "progress_calls": 200_000,
        "http_seconds": 10.0,
        "scale": 1_000_000,
        "redis_scale": 1_000_000,
    }
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    load = os.getloadavg()
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": (
            f"{platform.processor() or platform.machine()}, "
            f"{psutil.cpu_count()} CPUs, load {load[0]:.1f} at start, "
            f"Python {platform.python_version()}"
        ),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip(),
        "args": vars(args),
        "sections": {},
    }
    try:
        asyncio.run(_run(args, results))
    finally:
        results["load_at_end"] = round(os.getloadavg()[0], 1)
        RESULTS.mkdir(exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        path = RESULTS / f"run-{stamp}.json"
        path.write_text(json.dumps(results, indent=2))
        _print(results)
        print(f"load at end {results['load_at_end']}; JSON: {path}")


if __name__ == "__main__":
    main()
