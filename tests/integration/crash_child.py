"""A process that runs a JobManager on a SQLite file, for the crash tests.

Usage: ``python crash_child.py DB MODE OPTIONS_JSON``. It prints one line per event
(``ready``, ``started <job id> <attempt>``, ``summary <json>``) and flushes each, so
the test can act on them. With ``"redis": {"url": ..., "prefix": ...}`` in the
options, the store and queue are Redis ones on that key prefix instead of the
SQLite file DB and a memory queue. Modes:

- ``forever``: run jobs until killed.
- ``until-idle``: run until no job is queued or running, then exit 0.
- ``b28``: submit ``count`` chatty jobs, poll the list while they run, print a summary.
- ``b29-run``, ``b29-startup-fail``, ``b29-drop``, ``b29-cancel``: lifecycle exits.
- ``b42``: submit, fail, retry by hand, finish; print the job's JSON at each step.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backgrounder import (
    Job,
    JobManager,
    JobStatus,
    NonRetryableError,
    NoopRunner,
    RunContext,
    Stage,
    TaskRegistry,
)
from backgrounder.queue.memory import MemoryQueue
from backgrounder_redis import RedisQueue, RedisStore


def say(*parts: object) -> None:
    """Print one event line and flush it at once."""
    print(*parts, flush=True)


class Work:
    """The crash tests' runner, steered by the job's params.

    ``exit_on``: attempts on which the process dies (os._exit) once started;
    ``hang_on``: attempts on which it waits forever; ``sleep``: seconds on the
    job's clock before finishing; ``results``: a SQLite file that gets one row per
    job id on success.
    """

    async def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        say("started", job.id, job.attempt)
        await ctx.progress(50, Stage.infer, 1, 2)
        if job.attempt in job.params.get("exit_on", ()):
            os._exit(70)
        if job.attempt in job.params.get("hang_on", ()):
            await asyncio.Event().wait()
        if job.params.get("sleep"):
            await ctx.sleep(job.params["sleep"])
        if "results" in job.params:
            await asyncio.to_thread(_record, job.params["results"], job.id, job.attempt)
        return {"ok": True, "attempt": job.attempt, "pid": os.getpid()}


def _record(path: str, job_id: str, attempt: int) -> None:
    with sqlite3.connect(path, timeout=30) as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS results (id TEXT PRIMARY KEY, attempt INT)"
        )
        db.execute("INSERT OR IGNORE INTO results VALUES (?, ?)", (job_id, attempt))


class Chatty:
    """Reports progress 50 times with no pause, ending at 100."""

    async def execute(self, job: Job, ctx: RunContext) -> None:
        for i in range(1, 51):
            await ctx.progress(i * 2, Stage.infer, i, 50)


class Flaky:
    """Fails for good on attempt 1, succeeds afterwards."""

    async def execute(self, job: Job, ctx: RunContext) -> dict[str, int]:
        await ctx.progress(30, Stage.fetch, 3, 10)
        if job.attempt == 1:
            raise NonRetryableError("first attempt fails")
        return {"attempt": job.attempt}


class _SlowClaim:
    """Pauses 50 ms after each dequeue, widening the dequeue-to-start window."""

    async def claim_many(self, **claim: Any) -> list[str]:
        ids: list[str] = await super().claim_many(**claim)  # type: ignore[misc]
        if ids:
            await asyncio.sleep(0.05)
        return ids


class SlowClaimQueue(_SlowClaim, MemoryQueue):
    """A memory queue that pauses 50 ms after each dequeue."""


class SlowClaimRedisQueue(_SlowClaim, RedisQueue):
    """A Redis queue that pauses 50 ms after each dequeue."""


class FailingQueue(MemoryQueue):
    """A queue whose open() raises: a start-up failure after the store opened."""

    async def open(self, clock: Any) -> None:
        raise RuntimeError("queue plugin refused to start")


def backend(
    db: str, options: dict[str, Any], *, slow_claim: bool = False
) -> dict[str, Any]:
    """Return the store/queue options of JobManager for DB and ``options``.

    Takes ``redis`` out of ``options``. Without it: the SQLite file DB and a
    memory queue (slow to claim if asked).
    """
    redis = options.pop("redis", None)
    if redis is None:
        return {"db_path": db, "queue": SlowClaimQueue() if slow_claim else None}
    url, prefix = redis["url"], redis["prefix"]
    queue_class = SlowClaimRedisQueue if slow_claim else RedisQueue
    return {
        "store": RedisStore(url, prefix=prefix),
        "queue": queue_class(url, prefix=prefix),
    }


def registry() -> TaskRegistry:
    tasks = TaskRegistry()
    tasks.add("work", Work())
    tasks.add("chatty", Chatty())
    tasks.add("flaky", Flaky())
    tasks.add("noop", NoopRunner(sleep_ms=0))
    return tasks


async def idle(manager: JobManager) -> bool:
    counts = await manager.store.count_by_status()
    return counts[JobStatus.queued] + counts[JobStatus.running] == 0


async def main(db: str, mode: str, options: dict[str, Any]) -> int:
    if mode.startswith("b29"):
        return await b29(db, mode, options)
    if mode == "b42":
        return await b42(backend(db, options))
    slow_claim = options.pop("slow_claim", False)
    where = backend(db, options, slow_claim=slow_claim)
    manager = JobManager(registry=registry(), **where, **options)
    async with manager:
        say("ready")
        if mode == "forever":
            await asyncio.Event().wait()
        if mode == "b28":
            return await b28(manager)
        while not await idle(manager):
            await asyncio.sleep(0.05)
    return 0


async def b28(manager: JobManager) -> int:
    count = int(os.environ.get("B28_JOBS", "50"))
    jobs = await asyncio.gather(*(manager.submit("chatty") for _ in range(count)))

    async def poll() -> None:
        while not await idle(manager):
            await manager.list(limit=50)
            await asyncio.sleep(0.01)

    await poll()
    finals = [await manager.get(j.id) for j in jobs]
    say(
        "summary",
        json.dumps(
            {
                "ids": [j.id for j in finals],
                "not_done": [j.id for j in finals if j.status != JobStatus.done],
                "not_100": [j.id for j in finals if j.progress.percent != 100],
            }
        ),
    )
    return 0


async def b29(db: str, mode: str, options: dict[str, Any]) -> int:
    before = threading.active_count()
    where = backend(db, options)
    if mode == "b29-run":
        async with JobManager(registry=registry(), **where) as manager:
            job = await manager.submit("noop")
            async for event in manager.events(job.id):
                if event.job.is_terminal:
                    say("job", event.job.status)
    elif mode == "b29-startup-fail":
        where["queue"] = FailingQueue()
        manager = JobManager(registry=registry(), **where)
        try:
            await manager.start()
        except RuntimeError as exc:
            say("start failed:", exc)
    elif mode == "b29-drop":
        manager = JobManager(registry=registry(), **where)
        await manager.start()
        job = await manager.submit("noop")
        say("submitted", job.id)
        del manager
    elif mode == "b29-cancel":
        async with JobManager(registry=registry(), worker_count=0, **where) as m:
            calls = [
                asyncio.ensure_future(m.submit("noop", {"i": i})) for i in range(50)
            ]
            await asyncio.sleep(0)
            for call in calls[::2]:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
    say(
        "threads",
        before,
        threading.active_count(),
        [t.name for t in threading.enumerate()],
    )
    return 0


async def b42(where: dict[str, Any]) -> int:
    async with JobManager(registry=registry(), **where) as manager:
        job = await manager.submit("flaky")
        failed = await wait_terminal(manager, job.id)
        say("failed", failed.model_dump_json())
        await manager.retry(job.id)
        done = await wait_terminal(manager, job.id)
        say("done", done.model_dump_json())
    return 0


async def wait_terminal(manager: JobManager, job_id: str) -> Job:
    async for event in manager.events(job_id):
        if event.job.is_terminal:
            return event.job
    return await manager.get(job_id)


if __name__ == "__main__":
    db_path, run_mode = sys.argv[1], sys.argv[2]
    opts = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    sys.exit(asyncio.run(main(db_path, run_mode, opts)))
