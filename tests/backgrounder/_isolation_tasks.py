"""Runners that the process-isolation tests run in child processes.

They live in their own module so a child imports them without importing pytest
or the tests. Each reports its pid in a progress message when it starts, so a
test can watch the child it runs in.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from backgrounder import Assets, Job, NonRetryableError, RunContext, Stage


def _spin() -> None:
    """Burn CPU without ever returning or yielding: blocking C-like work."""
    while True:
        pass


def _started(ctx: RunContext) -> None:
    ctx.progress_nowait(1, Stage.infer, message=str(os.getpid()))


class BusyLoop:
    """A sync runner that busy-loops forever."""

    def execute(self, job: Job, ctx: RunContext) -> None:
        _started(ctx)
        _spin()


class AsyncBusyLoop:
    """An async runner that calls blocking sync code and never awaits again."""

    async def execute(self, job: Job, ctx: RunContext) -> None:
        await ctx.progress(1, Stage.infer, message=str(os.getpid()))
        _spin()


class SleepySync:
    """A sync runner stuck in one long blocking call; it never checks for cancel."""

    def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        _started(ctx)
        time.sleep(float(job.params.get("seconds", 60)))
        return {"pid": os.getpid()}


class CooperativeSync:
    """A sync runner that checks for cancel between short steps."""

    def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        _started(ctx)
        while job.params.get("wait", True):
            ctx.check_canceled_nowait()
            time.sleep(0.01)
        return {"pid": os.getpid()}


class StubbornAsync:
    """An async runner that sleeps in a loop, never checks for cancel, and marks
    its ``finally`` in a file (case B19)."""

    def __init__(self, marker_dir: str) -> None:
        self.marker_dir = marker_dir

    async def execute(self, job: Job, ctx: RunContext) -> None:
        _started(ctx)
        try:
            while True:
                await asyncio.sleep(0.05)
        finally:
            Path(self.marker_dir, f"finally-{job.id}").touch()


class DiesOnFirstAttempt:
    """Waits to be killed on attempt 1; returns its pid on later attempts."""

    def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        if job.attempt == 1:
            _started(ctx)
            time.sleep(60)
        return {"pid": os.getpid(), "attempt": job.attempt}


class Counting:
    """Marks setup and teardown in files; returns what the child looks like."""

    def __init__(self, marker_dir: str) -> None:
        self.marker_dir = marker_dir
        self.setups = 0

    def setup(self) -> None:
        self.setups += 1
        Path(self.marker_dir, f"setup-{os.getpid()}").touch()

    async def teardown(self) -> None:
        Path(self.marker_dir, f"teardown-{os.getpid()}").touch()

    def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "setups": self.setups,
            "gpus": ctx.gpus,
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "order": os.environ.get("CUDA_DEVICE_ORDER"),
            "attempt": ctx.attempt,
        }


class Reporter:
    """An async runner that walks stages, attaches assets and returns Assets."""

    async def execute(self, job: Job, ctx: RunContext) -> Assets:
        for index, stage in enumerate((Stage.fetch, Stage.infer, Stage.write)):
            await ctx.check_canceled()
            await ctx.progress((index + 1) * 30, stage, index + 1, 3, f"{stage} done")
        await ctx.attach_assets(custom={"partial": {"href": f"/tmp/{job.id}.part"}})
        return Assets(custom={"output": {"href": f"/tmp/{job.id}.json"}})


class Failing:
    """Raises what its params say."""

    def execute(self, job: Job, ctx: RunContext) -> None:
        if job.params.get("kind") == "final":
            raise NonRetryableError("the input can never work")
        raise ValueError(f"bad input {job.params.get('n')}")


class BadOutput:
    """Returns a value JSON cannot carry."""

    def execute(self, job: Job, ctx: RunContext) -> Any:
        return {"when": object()}


class BrokenSetup:
    """Its setup() fails."""

    def setup(self) -> None:
        raise RuntimeError("model file missing")

    def execute(self, job: Job, ctx: RunContext) -> None:
        return None
