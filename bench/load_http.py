"""HTTP load: concurrent submits, repeated idempotency keys, cancels, workers running.

Starts the app (``setup_backgrounder``, SQLite temp file, in-process workers) under
uvicorn on a free 127.0.0.1 port in a thread, then fires ``--submits`` POSTs from
``--concurrency`` clients (a third of them reuse an idempotency key three times),
while cancellers cancel random accepted jobs. The runner records every (job id,
attempt) it runs and fails the first attempt of some jobs (``max_retries=1``). At
the end it waits for every job to end and prints the request rate and the counts
that must be zero: 5xx answers, lost jobs (accepted but not readable or not listed),
duplicated jobs (a key answered with two ids), attempts run twice, jobs not
terminal, jobs done although a cancel was answered 200. With ``--redis URL`` the
jobs are kept in a Redis store and queue on a fresh key prefix (deleted at the end)
instead.

    python bench/load_http.py [--submits 5000] [--concurrency 64] [--workers 8]
                              [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from backgrounder import Job, RunContext, TaskRegistry
from backgrounder.fastapi import setup_backgrounder

API = "/api/v1/jobs"
TERMINAL = {"done", "failed", "canceled"}


class Work:
    """Records each (job, attempt) run; fails the first attempt when asked."""

    def __init__(self) -> None:
        self.runs: Counter[tuple[str, int]] = Counter()
        self.lock = threading.Lock()

    async def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        with self.lock:
            self.runs[(job.id, job.attempt)] += 1
        await ctx.sleep(job.params.get("ms", 1) / 1000)
        if job.params.get("fail_first") and job.attempt == 1:
            raise RuntimeError(f"first attempt of {job.id} fails")
        return {"ok": True}


@dataclass
class Report:
    requests: int = 0
    seconds: float = 0.0
    status: Counter[int] = field(default_factory=Counter)
    accepted: set[str] = field(default_factory=set)
    order: list[str] = field(default_factory=list)
    by_key: dict[str, set[str]] = field(default_factory=dict)
    cancels: Counter[int] = field(default_factory=Counter)
    cancel_accepted: set[str] = field(default_factory=set)
    final: Counter[str] = field(default_factory=Counter)
    done_after_cancel: int = 0
    lost: int = 0
    duplicated_keys: int = 0
    attempts_run_twice: int = 0
    not_terminal: int = 0
    server_errors: int = 0

    def line(self) -> str:
        rate = self.requests / self.seconds if self.seconds else 0.0
        return (
            f"{self.requests} requests in {self.seconds:.1f} s ({rate:.0f} req/s); "
            f"{len(self.accepted)} jobs, {sum(self.cancels.values())} cancels "
            f"{dict(self.cancels)}; final {dict(self.final)}; 5xx "
            f"{self.server_errors}, lost {self.lost}, duplicated "
            f"{self.duplicated_keys}, attempts run twice {self.attempts_run_twice}, "
            f"not terminal {self.not_terminal}, done after an accepted cancel "
            f"{self.done_after_cancel} (of {len(self.cancel_accepted)} jobs)"
        )


def build_app(
    db: Path, workers: int, redis_prefix: tuple[str, str] | None = None
) -> tuple[FastAPI, Work]:
    """The app on the SQLite file ``db``, or on Redis (url, key prefix)."""
    work = Work()
    registry = TaskRegistry()
    registry.add("work", work, max_retries=1)
    where: dict[str, Any] = {"db_path": db}
    if redis_prefix is not None:
        url, prefix = redis_prefix
        spec = f"{url}{'&' if '?' in url else '?'}prefix={prefix}"
        where = {"store": spec, "queue": spec}
    app = FastAPI()
    setup_backgrounder(
        app,
        registry=registry,
        worker_count=workers,
        retry_backoff_seconds=0,
        **where,
    )
    return app, work


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (the run's own)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread of its own."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


async def run_load(
    base_url: str, work: Work, submits: int, concurrency: int, seed: int = 0
) -> Report:
    rng = random.Random(seed)
    report = Report()
    keyed = submits // 3
    plan: list[dict[str, Any]] = []
    for i in range(submits):
        body: dict[str, Any] = {
            "task": "work",
            "params": {"ms": rng.randint(0, 3), "fail_first": rng.random() < 0.2},
        }
        if i < keyed:
            key = f"key-{i // 3}"
            body["idempotency_key"] = key
            body["params"] = {"ms": 1, "key": key}  # same params for each reuse
        plan.append(body)
    rng.shuffle(plan)
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in plan:
        queue.put_nowait(body)
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency
    )
    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=60
    ) as client:

        async def submitter() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                response = await client.post(API, json=body)
                report.requests += 1
                report.status[response.status_code] += 1
                if response.status_code in (200, 202):
                    job_id = response.json()["id"]
                    report.accepted.add(job_id)
                    report.order.append(job_id)
                    if "idempotency_key" in body:
                        report.by_key.setdefault(body["idempotency_key"], set()).add(
                            job_id
                        )

        async def canceller() -> None:
            while not queue.empty():
                if report.order:
                    job_id = rng.choice(report.order[-8:])
                    response = await client.post(f"{API}/{job_id}/cancel")
                    report.requests += 1
                    report.cancels[response.status_code] += 1
                    report.status[response.status_code] += 1
                    if response.status_code == 200:
                        report.cancel_accepted.add(job_id)
                await asyncio.sleep(0)

        started = time.perf_counter()
        await asyncio.gather(
            *(submitter() for _ in range(concurrency)),
            *(canceller() for _ in range(max(1, concurrency // 16))),
        )
        report.seconds = time.perf_counter() - started
        await settle(client, report)
    report.server_errors = sum(n for code, n in report.status.items() if code >= 500)
    report.duplicated_keys = sum(1 for ids in report.by_key.values() if len(ids) > 1)
    report.attempts_run_twice = sum(1 for n in work.runs.values() if n > 1)
    return report


async def settle(client: httpx.AsyncClient, report: Report) -> None:
    """Wait until every accepted job ends; count lost and unfinished jobs."""
    deadline = time.monotonic() + 120
    pending = set(report.accepted)
    final: dict[str, str] = {}
    while pending and time.monotonic() < deadline:
        for job_id in list(pending):
            response = await client.get(f"{API}/{job_id}")
            if response.status_code == 404:
                report.lost += 1
                pending.discard(job_id)
            elif response.json()["status"] in TERMINAL:
                final[job_id] = response.json()["status"]
                pending.discard(job_id)
        if pending:
            await asyncio.sleep(0.1)
    report.not_terminal = len(pending)
    report.final = Counter(final.values())
    report.done_after_cancel = sum(
        1 for job_id in report.cancel_accepted if final.get(job_id) == "done"
    )
    listed: set[str] = set()
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if cursor:
            params["cursor"] = cursor
        body = (await client.get(API, params=params)).json()
        listed |= {job["id"] for job in body["items"]}
        cursor = body.get("next_cursor")
        if not cursor:
            break
    report.lost += len(report.accepted - listed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--redis", metavar="URL", help="keep jobs in Redis there")
    args = parser.parse_args()
    redis = None
    if args.redis:
        redis = (args.redis, f"bgbench:{uuid.uuid4().hex[:12]}")
    with tempfile.TemporaryDirectory() as folder:
        app, work = build_app(Path(folder) / "jobs.db", args.workers, redis)
        try:
            with ServerThread(app) as server:
                report = asyncio.run(
                    run_load(
                        server.url, work, args.submits, args.concurrency, args.seed
                    )
                )
        finally:
            if redis is not None:
                asyncio.run(delete_prefix(*redis))
    where = "Redis" if redis else "SQLite"
    print(f"{where}: {report.line()}")


if __name__ == "__main__":
    main()
