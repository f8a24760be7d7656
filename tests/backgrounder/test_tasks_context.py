"""RunContext and TaskRegistry as a runner author meets them."""

from __future__ import annotations

import pytest

from backgrounder import Job, RunContext, Stage, TaskRegistry
from backgrounder.errors import ConfigurationError, JobCanceled
from backgrounder_testing import FakeClock


def _ctx(clock: FakeClock) -> tuple[RunContext, list[object]]:
    now = clock.now()
    seen: list[object] = []
    job = Job(id="j", task="t", created_at=now, updated_at=now)
    return RunContext(job, clock=clock, progress_sink=seen.append), seen


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((101,), "between 0 and 100"),
        ((-1,), "between 0 and 100"),
        ((True,), "number"),
        ((10, "warmup"), "stage must be a Stage"),
        ((10, Stage.fetch, 11, 10), "greater than total"),
        ((10, Stage.fetch, -1, 10), "processed"),
    ],
)
async def test_progress_refuses_values_out_of_range(
    clock: FakeClock, args: tuple[object, ...], message: str
) -> None:
    """Bad progress raises ValueError naming the problem; nothing is recorded."""
    ctx, seen = _ctx(clock)

    with pytest.raises(ValueError, match=message):
        await ctx.progress(*args)  # type: ignore[arg-type]
    assert seen == []


async def test_progress_readme_call_is_one_of_ten_items(clock: FakeClock) -> None:
    """ctx.progress(10, Stage.fetch, 1, 10) records 1 of 10 at 10 percent."""
    ctx, seen = _ctx(clock)

    await ctx.progress(10, Stage.fetch, 1, 10)
    await ctx.progress(5, "infer")  # may go down when a new stage starts

    assert [(p.percent, p.stage, p.processed, p.total) for p in seen] == [  # type: ignore[attr-defined]
        (10.0, Stage.fetch, 1, 10),
        (5.0, Stage.infer, 0, 0),
    ]
    assert ctx.last_progress.stage == Stage.infer


async def test_check_canceled_raises_once_requested(clock: FakeClock) -> None:
    """check_canceled is quiet until a cancel is requested, then raises JobCanceled."""
    ctx, _ = _ctx(clock)
    await ctx.check_canceled()

    ctx.request_cancel()

    with pytest.raises(JobCanceled):
        await ctx.check_canceled()
    with pytest.raises(JobCanceled):
        await ctx.sleep(10)


def test_registry_refuses_bad_registrations() -> None:
    """Duplicate names, a class instead of an instance, bad defaults are refused."""
    registry = TaskRegistry()
    registry.add("ok", _Runner())

    with pytest.raises(ConfigurationError, match="already registered"):
        registry.add("ok", _Runner())
    with pytest.raises(ConfigurationError, match="pass an instance"):
        registry.add("cls", _Runner)
    with pytest.raises(ConfigurationError, match="timeout_seconds"):
        registry.add("t0", _Runner(), timeout_seconds=0)
    with pytest.raises(ConfigurationError, match="max_retries"):
        registry.add("r", _Runner(), max_retries=-1)
    assert registry.names() == ["ok"]


class _Runner:
    async def execute(self, job: Job, ctx: RunContext) -> None:
        return None
