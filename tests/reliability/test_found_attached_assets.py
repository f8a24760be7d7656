"""Found: assets saved with ctx.attach_assets were erased when the job ended done.

A runner that attaches its outputs as they appear and returns None ended with
``assets`` null (GET /assets answered ``{}``): the done write set the returned
value, None, over what had been attached. ``backgrounder_testing.run_task``
("runs one attempt the way a worker does") keeps the attached assets.
"""

from __future__ import annotations

import pytest

from backgrounder import Assets, Job, RunContext, TaskRegistry
from tests.conftest import ManagerFactory, wait_for


class _Chunks:
    async def execute(self, job: Job, ctx: RunContext) -> None:
        await ctx.attach_assets(custom={"chunk-1": {"href": "/c/1"}})
        await ctx.attach_assets(custom={"chunk-2": {"href": "/c/2"}})


@pytest.mark.all_backends
async def test_attached_assets_survive_a_none_return(
    make_manager: ManagerFactory,
) -> None:
    registry = TaskRegistry()
    registry.add("chunks", _Chunks())
    manager = await make_manager(registry, worker_count=1)

    job = await manager.submit("chunks")
    ended = await wait_for(manager, job.id, "done")

    expected = Assets(custom={"chunk-1": {"href": "/c/1"}, "chunk-2": {"href": "/c/2"}})
    assert ended.assets == expected
    assert await manager.assets(job.id) == expected


class _AttachThenFailOnce:
    """Attempt 1 attaches a partial output and fails; attempt 2 attaches its own."""

    async def execute(self, job: Job, ctx: RunContext) -> None:
        await ctx.attach_assets(custom={f"part-{job.attempt}": {"href": "/p"}})
        if job.attempt == 1:
            raise RuntimeError("upstream answered 503")


@pytest.mark.all_backends
async def test_an_automatic_retry_starts_without_the_failed_attempts_assets(
    make_manager: ManagerFactory,
) -> None:
    """As a manual retry does: the done job holds only its last attempt's outputs."""
    registry = TaskRegistry()
    registry.add("flaky", _AttachThenFailOnce())
    manager = await make_manager(registry, worker_count=1, retry_backoff_seconds=0)

    job = await manager.submit("flaky", max_retries=1)
    ended = await wait_for(manager, job.id, "done")

    assert ended.attempt == 2
    assert ended.assets == Assets(custom={"part-2": {"href": "/p"}})
