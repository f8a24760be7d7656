"""Helpers of the case and acceptance tests: test-driven runners and clock driving."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from backgrounder import Job, JobManager, RunContext
from backgrounder_testing import FakeClock


class Probe:
    """An async runner the test steers through the job's params.

    ``name`` tags the job; ``block`` makes it wait on ``gates[name]``; ``fail``
    makes it raise (``fail_on``: only on those attempts); ``per_attempt`` tags
    each attempt as ``name#attempt``; ``stage`` is reported as progress first.
    Every start is recorded in ``order`` and ``runs`` and sets ``started[name]``.
    """

    def __init__(self) -> None:
        self.started: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.order: list[str] = []
        self.runs: Counter[str] = Counter()
        self.finished: Counter[str] = Counter()

    async def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        name = str(job.params.get("name", job.id))
        if job.params.get("per_attempt"):
            name = f"{name}#{job.attempt}"
        self.order.append(name)
        self.runs[name] += 1
        if "stage" in job.params:
            await ctx.progress(40, job.params["stage"], 2, 5)
        self.started[name].set()
        if job.params.get("block"):
            await self.gates[name].wait()
        await ctx.check_canceled()
        if job.params.get("fail") or job.attempt in job.params.get("fail_on", ()):
            raise RuntimeError(f"{name} failed on attempt {job.attempt}")
        self.finished[name] += 1
        return {"name": name, "attempt": job.attempt}


async def started(probe: Probe, name: str, timeout: float = 10.0) -> None:
    """Wait until the probe's job ``name`` has started."""
    async with asyncio.timeout(timeout):
        await probe.started[name].wait()


async def drive_until(
    clock: FakeClock,
    manager: JobManager,
    job_id: str,
    predicate: Callable[[Job], bool],
    *,
    step: float = 0.25,
    limit: float = 600.0,
    timeout: float = 20.0,
) -> Job:
    """Advance the fake clock in steps until the stored job satisfies ``predicate``.

    Each step reads the job from the store, which lets the worker's own store
    calls finish. Fails when ``limit`` fake seconds pass first.
    """
    end = clock.monotonic() + limit
    async with asyncio.timeout(timeout):
        while True:
            job = await manager.get(job_id)
            if predicate(job):
                return job
            if clock.monotonic() >= end:
                raise AssertionError(
                    f"job {job_id} still {job.status} (attempt {job.attempt}) after "
                    f"{limit} fake seconds"
                )
            await clock.advance_async(step)


async def settle(manager: JobManager, rounds: int = 5) -> None:
    """Let in-flight store calls finish: a few store round trips."""
    for _ in range(rounds):
        await manager.store.count_by_status()
        await asyncio.sleep(0)
