"""run_task: one attempt run as a worker runs it, with misuse reported."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from backgrounder import (
    Assets,
    ConfigurationError,
    Job,
    JobCanceled,
    JobStatus,
    NonRetryableError,
    NoopRunner,
    RunContext,
    Stage,
)
from backgrounder.errors import InvalidParamsError, ResourceRequestError
from backgrounder.models import ErrorCode
from backgrounder_testing import FakeClock, TaskMistakeError, run_task


class Sleeper:
    """Report progress around a sleep on the job's clock."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        await ctx.progress(10, Stage.infer, message="loaded")
        await ctx.sleep(self.seconds)
        await ctx.progress(100, Stage.write)
        return {"slept": self.seconds}


class Batches:
    """Process items in batches, reporting and checking for cancel each time."""

    async def execute(self, job: Job, ctx: RunContext) -> Assets:
        items = job.params["items"]
        for done in range(1, len(items) + 1):
            await ctx.check_canceled()
            await ctx.progress(100 * done / len(items), Stage.infer, done, len(items))
        return Assets(custom={"count": len(items)})


class SyncBatches:
    """A sync runner: runs in a thread, uses the *_nowait calls."""

    def __init__(self) -> None:
        self.thread: str | None = None

    def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        self.thread = threading.current_thread().name
        for done in range(1, 5):
            ctx.check_canceled_nowait()
            ctx.progress_nowait(done * 25, Stage.preprocess, done, 4)
        return {"done": 4}


async def test_run_task_records_every_progress_event_in_order() -> None:
    """NoopRunner ends done with one progress event per stage plus the last."""
    result = await run_task(NoopRunner(sleep_ms=500, stages=3))

    assert result.status == JobStatus.done and result.ok
    assert result.assets == Assets(custom={"stages": 3})
    assert [(p.stage, p.processed) for p in result.progress] == [
        (Stage.fetch, 0),
        (Stage.preprocess, 1),
        (Stage.infer, 2),
        (Stage.infer, 3),
    ]
    assert result.elapsed_seconds == pytest.approx(1.5)


async def test_run_task_times_out_on_the_clock() -> None:
    """A two-hour sleep under a one-hour limit ends timeout at 3600 s of fake time."""
    result = await run_task(Sleeper(7200), timeout_seconds=3600)

    assert result.status == JobStatus.failed
    assert result.error is not None
    assert result.error.code == ErrorCode.timeout
    assert result.error.stage == Stage.infer
    assert result.elapsed_seconds == 3600
    assert result.last_progress.message == "loaded"


async def test_run_task_default_timeout_is_the_worker_default() -> None:
    """Left out, the limit is the runner's attribute, then 3600; None is no limit."""
    timed_out = await run_task(Sleeper(3601))
    assert timed_out.error is not None
    assert timed_out.error.code == ErrorCode.timeout
    unlimited = await run_task(Sleeper(7200), timeout_seconds=None)
    assert unlimited.status == JobStatus.done
    assert unlimited.assets == Assets(custom={"slept": 7200})

    runner = Sleeper(20)
    runner.timeout_seconds = 10  # type: ignore[attr-defined]
    assert (await run_task(runner)).error.code == ErrorCode.timeout  # type: ignore[union-attr]


async def test_run_task_runs_sync_runner_in_a_thread() -> None:
    """A plain def runner runs off the event loop and its progress is recorded."""
    runner = SyncBatches()
    result = await run_task(runner)

    assert result.status == JobStatus.done
    assert runner.thread is not None and runner.thread != "MainThread"
    assert [p.percent for p in result.progress] == [25, 50, 75, 100]


@pytest.mark.parametrize("runner", [Batches(), SyncBatches()], ids=["async", "sync"])
async def test_run_task_cancels_after_progress_events(runner: Any) -> None:
    """cancel_after_progress=2 ends the attempt canceled at the next check."""
    result = await run_task(runner, {"items": list(range(4))}, cancel_after_progress=2)

    assert result.status == JobStatus.canceled
    assert result.error is not None and result.error.code == ErrorCode.canceled
    assert len(result.progress) == 2


async def test_run_task_forces_cancel_after_the_grace() -> None:
    """A runner that ignores a cancel is stopped after cancel_grace_seconds."""

    class Stubborn:
        async def execute(self, job: Job, ctx: RunContext) -> None:
            await ctx.progress(1, Stage.fetch)
            while True:
                await ctx.clock.sleep(1)

    result = await run_task(
        Stubborn(), cancel_after_progress=1, cancel_grace_seconds=30
    )

    assert result.status == JobStatus.canceled
    assert result.elapsed_seconds == 30


async def test_run_task_with_manual_clock() -> None:
    """With autojump=False the test moves the clock, and a sleep wakes on it."""
    clock = FakeClock()
    running = asyncio.ensure_future(run_task(Sleeper(60), clock=clock, autojump=False))
    await clock.settle()
    assert not running.done()

    clock.advance(60)
    async with asyncio.timeout(5):
        result = await running
    assert result.status == JobStatus.done
    assert result.progress[-1].updated_at == clock.now()


async def test_run_task_reports_error_and_retryability() -> None:
    """An exception fails the attempt; NonRetryableError marks it final."""

    class Flaky:
        async def execute(self, job: Job, ctx: RunContext) -> None:
            await ctx.progress(50, Stage.fetch)
            if job.attempt == 1:
                raise ConnectionError("upstream reset")
            raise NonRetryableError("bad input file")

    first = await run_task(Flaky())
    second = await run_task(Flaky(), attempt=2)

    assert first.status == JobStatus.failed
    assert first.error is not None and first.error.retryable
    assert first.error.stage == Stage.fetch and first.error.attempt == 1
    assert isinstance(first.exception, ConnectionError)
    assert "upstream reset" in repr(first)
    assert second.error is not None and not second.error.retryable
    with pytest.raises(NonRetryableError, match="bad input file"):
        second.raise_for_error()


async def test_run_task_canceled_runner_raising_jobcanceled_is_canceled() -> None:
    """A runner that raises JobCanceled itself ends canceled, not failed."""

    class GivesUp:
        async def execute(self, job: Job, ctx: RunContext) -> None:
            raise JobCanceled("nothing left to do", job_id=job.id)

    assert (await run_task(GivesUp())).status == JobStatus.canceled


async def test_run_task_keeps_attached_assets() -> None:
    """Assets attached with ctx.attach_assets are kept when nothing is returned."""

    class Chunks:
        async def execute(self, job: Job, ctx: RunContext) -> None:
            await ctx.attach_assets(custom={"chunk-1": {"href": "/c/1"}})
            await ctx.attach_assets(custom={"chunk-2": {"href": "/c/2"}})

    result = await run_task(Chunks())
    assert result.assets == Assets(
        custom={"chunk-1": {"href": "/c/1"}, "chunk-2": {"href": "/c/2"}}
    )


class BadPercent:
    async def execute(self, job: Job, ctx: RunContext) -> None:
        await ctx.progress(150, Stage.fetch)


class BadStage:
    async def execute(self, job: Job, ctx: RunContext) -> None:
        await ctx.progress(10, "download")


class ReturnsList:
    async def execute(self, job: Job, ctx: RunContext) -> list[int]:
        return [1, 2]


class ReturnsDatetimeDict:
    async def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        return {"when": {1, 2}}


class ForgetsAwait:
    async def execute(self, job: Job, ctx: RunContext) -> None:
        ctx.progress(10, Stage.fetch)  # type: ignore[unused-coroutine]


class SyncCallsAsync:
    def execute(self, job: Job, ctx: RunContext) -> None:
        ctx.progress(10, Stage.fetch)  # type: ignore[unused-coroutine]


class AttachesNonJson:
    async def execute(self, job: Job, ctx: RunContext) -> None:
        await ctx.attach_assets(custom={"tensor": object()})


@pytest.mark.parametrize(
    ("runner", "expected"),
    [
        (
            BadPercent(),
            r"ctx.progress\(150, Stage.fetch\) was refused: percent must "
            r"be between 0 and 100 \(got 150\) \(test_harness.py:\d+\)",
        ),
        (BadStage(), r"stage must be a Stage \(idle, fetch.*got 'download'"),
        (ReturnsList(), r"execute returned a list; return Assets, a dict of JSON"),
        (ReturnsDatetimeDict(), r"output.when is a set"),
        (
            ForgetsAwait(),
            r"ctx.progress\(10, Stage.fetch\) was called without "
            r"await \(test_harness.py:\d+\).*add await",
        ),
        (SyncCallsAsync(), r"without await.*must call the \*_nowait variant"),
        (AttachesNonJson(), r"attach_assets\(...\) was refused: assets.custom.tensor"),
    ],
    ids=[
        "percent",
        "stage",
        "return-list",
        "return-set",
        "no-await",
        "sync-async",
        "attach",
    ],
)
async def test_run_task_names_the_mistake(runner: Any, expected: str) -> None:
    """Each usual misuse of the runner API fails with what is wrong and where."""
    with pytest.raises(TaskMistakeError, match=expected) as caught:
        await run_task(runner)

    assert caught.value.result.mistakes


async def test_run_task_not_strict_returns_what_the_worker_records() -> None:
    """strict=False gives the worker's outcome for output it cannot store."""
    result = await run_task(ReturnsList(), strict=False)

    assert result.status == JobStatus.failed
    assert result.error is not None
    assert result.error.type == "InvalidOutputError"
    assert not result.error.retryable
    assert result.mistakes and not result.ok


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"when": {1, 2}}, r"params.when is a set"),
        ([1, 2], r"params must be a JSON object"),
        ({"x": float("nan")}, r"params.x is nan"),
        ({"x": object()}, r"params.x is an object \("),
    ],
    ids=["set", "list", "nan", "object"],
)
async def test_run_task_refuses_params_that_are_not_json(
    params: Any, expected: str
) -> None:
    """Params are checked as submit checks them, before the runner runs."""
    with pytest.raises(InvalidParamsError, match=expected):
        await run_task(NoopRunner(), params)


async def test_run_task_refuses_a_runner_class() -> None:
    """Passing the class instead of an instance is named as such."""
    with pytest.raises(ConfigurationError, match="pass an instance, not the class"):
        await run_task(NoopRunner)


class UsesGpu:
    resources = {"gpu_memory_mb": 8000}

    async def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        return {"gpus": ctx.gpus}


async def test_run_task_gives_device_indexes() -> None:
    """A list of indexes becomes ctx.gpus as is."""
    result = await run_task(UsesGpu(), gpus=[1, 3])
    assert result.assets == Assets(custom={"gpus": [1, 3]})


async def test_run_task_reserves_simulated_gpus(simulated_gpus: type[Any]) -> None:
    """With simulated GPUs the runner gets a device with room for its request."""
    gpus = simulated_gpus([16_000, 24_000])
    gpus.set_used(1, 20_000)

    result = await run_task(UsesGpu(), gpus=gpus)
    assert result.gpus == [0]

    gpus.set_used(0, 12_000)
    with pytest.raises(ResourceRequestError, match="does not fit the simulated GPUs"):
        await run_task(UsesGpu(), gpus=gpus)
    with pytest.raises(ResourceRequestError, match="the largest has 4000 MB"):
        await run_task(UsesGpu(), gpus=simulated_gpus([4_000]))
