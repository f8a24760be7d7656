"""Tasks for the worker-process tests: each run is counted in Redis.

The worker processes import ``registry`` from here. ``BG_TEST_REDIS_URL`` and
``BG_TEST_PREFIX`` name where the runs are counted: ``<prefix>:runs:<job id>`` is
incremented at every execution, and ``<prefix>:runs:<job id>:attempts`` gets the
attempt and worker of each one.
"""

from __future__ import annotations

import os
from typing import Any

import redis.asyncio as aioredis

from backgrounder import TaskRegistry
from backgrounder.models import Job
from backgrounder.tasks import RunContext

_clients: dict[int, aioredis.Redis] = {}


def _client() -> aioredis.Redis:
    import asyncio

    loop_id = id(asyncio.get_running_loop())
    if loop_id not in _clients:
        _clients[loop_id] = aioredis.Redis.from_url(
            os.environ["BG_TEST_REDIS_URL"], decode_responses=True
        )
    return _clients[loop_id]


async def record_run(job: Job, ctx: RunContext) -> int:
    """Count this execution; return how many executions the job has had."""
    prefix = os.environ["BG_TEST_PREFIX"]
    client = _client()
    key = f"{prefix}:runs:{job.id}"
    runs = int(await client.incr(key))
    await client.rpush(f"{key}:attempts", f"{ctx.attempt}|{job.worker_id}")
    return runs


class Count:
    """Records the run, then takes ``ms`` milliseconds."""

    async def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        runs = await record_run(job, ctx)
        ms = float(job.params.get("ms", 0))
        if ms:
            await ctx.sleep(ms / 1000)
        return {"runs": runs}


class HoldFirst:
    """The first execution holds for ``seconds`` (to be killed); later ones end."""

    async def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        runs = await record_run(job, ctx)
        if runs == 1:
            await ctx.sleep(float(job.params.get("seconds", 60)))
        return {"runs": runs}


registry = TaskRegistry()
registry.add("count", Count(), max_retries=2)
registry.add("hold", HoldFirst(), max_retries=2)
