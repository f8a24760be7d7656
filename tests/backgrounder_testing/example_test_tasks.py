"""Tests of an embedding task, written as a task author writes them.

This file is the example of the README section "Testing your tasks"; the suite runs
it with pytester (tests/backgrounder_testing/test_plugin.py), so it stays true.
"""

from __future__ import annotations

import pytest

from backgrounder import Assets, Job, JobStatus, RunContext, Stage
from backgrounder_testing import SimulatedGPUs, TaskMistakeError, run_task, wait_for_job


class EmbedTask:
    """Embed texts in batches on one GPU (the model is faked here)."""

    resources = {"gpu_memory_mb": 6_000}
    timeout_seconds = 600

    async def execute(self, job: Job, ctx: RunContext) -> Assets:
        texts = job.params["texts"]
        batch = job.params.get("batch", 2)
        await ctx.progress(0, Stage.fetch, message="loading model")
        await ctx.sleep(job.params.get("load_seconds", 30))  # on the job's clock
        vectors: list[list[float]] = []
        for start in range(0, len(texts), batch):
            await ctx.check_canceled()
            vectors += [[float(len(text))] for text in texts[start : start + batch]]
            await ctx.progress(
                100 * len(vectors) / len(texts), Stage.infer, len(vectors), len(texts)
            )
            await ctx.sleep(job.params.get("pause_seconds", 5))
        return Assets(custom={"vectors": vectors, "gpus": ctx.gpus})


TEXTS = ["a", "bb", "ccc", "dddd"]


async def test_embed_reports_progress_per_batch() -> None:
    result = await run_task(EmbedTask(), {"texts": TEXTS})

    assert result.status == JobStatus.done
    assert [(p.stage, p.processed) for p in result.progress] == [
        (Stage.fetch, 0),
        (Stage.infer, 2),
        (Stage.infer, 4),
    ]
    assert result.assets is not None
    assert result.assets.custom["vectors"] == [[1.0], [2.0], [3.0], [4.0]]
    # 30 s of model load and two 5 s batches, on a fake clock: no real waiting.
    assert result.elapsed_seconds == 40


async def test_embed_stops_at_the_next_batch_when_canceled() -> None:
    result = await run_task(EmbedTask(), {"texts": TEXTS * 3}, cancel_after_progress=2)

    assert result.status == JobStatus.canceled
    assert result.last_progress.processed == 2


async def test_embed_times_out_on_a_huge_input() -> None:
    result = await run_task(EmbedTask(), {"texts": ["x"] * 400, "batch": 1})

    assert result.status == JobStatus.failed
    assert result.error is not None and result.error.code == "timeout"
    assert result.error.stage == Stage.infer


async def test_embed_takes_the_gpu_with_room() -> None:
    gpus = SimulatedGPUs(memory_mb=[8_000, 24_000])
    gpus.set_used(0, 4_000)  # another process holds half of GPU 0

    result = await run_task(EmbedTask(), {"texts": TEXTS}, gpus=gpus)

    assert result.gpus == [1]


async def test_a_broken_progress_call_is_named() -> None:
    class Broken:
        async def execute(self, job: Job, ctx: RunContext) -> None:
            await ctx.progress(150, Stage.infer)

    with pytest.raises(TaskMistakeError, match=r"percent must be between 0 and 100"):
        await run_task(Broken())


async def test_embed_job_runs_through_the_manager(bg_manager_factory, bg_gpus) -> None:
    manager = await bg_manager_factory(plugins=[bg_gpus([24_000])])
    manager.registry.add("embed", EmbedTask())

    params = {"texts": TEXTS, "load_seconds": 0, "pause_seconds": 0}
    job = await manager.submit("embed", params)

    done = await wait_for_job(manager, job.id)
    assert done.status == JobStatus.done
    assert await manager.assets(job.id) == Assets(
        custom={"vectors": [[1.0], [2.0], [3.0], [4.0]], "gpus": [0]}
    )


async def test_a_stuck_job_fails_with_timeout(bg_manager, bg_clock) -> None:
    class Stuck:
        async def execute(self, job: Job, ctx: RunContext) -> None:
            await ctx.progress(1, Stage.fetch)
            await ctx.sleep(2 * 3600)

    bg_manager.registry.add("stuck", Stuck())
    job = await bg_manager.submit("stuck", timeout_seconds=3600)
    await wait_for_job(bg_manager, job.id, "running")
    await bg_clock.settle()  # let the worker arm its timers

    bg_clock.advance(3601)  # an hour passes at once

    failed = await wait_for_job(bg_manager, job.id, "failed")
    assert failed.error is not None and failed.error.code == "timeout"
