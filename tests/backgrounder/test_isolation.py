"""Process isolation: tasks in spawned child processes, stopped for real (#7)."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest

from backgrounder import (
    Assets,
    ConfigurationError,
    Job,
    JobStatus,
    NoopRunner,
    ResourceLimits,
    RunContext,
    Stage,
    TaskRegistry,
)
from backgrounder.isolation import ChildTaskError, ProcessIsolationError, ProcessRunner
from backgrounder.models import ErrorCode
from backgrounder_testing import run_task
from tests.backgrounder import _isolation_tasks as tasks
from tests.backgrounder._isolation_support import child_pid, gone
from tests.backgrounder._isolation_support import (  # an autouse fixture
    no_child_left_behind as no_child_left_behind,
)
from tests.conftest import ManagerFactory, wait_for

#: Every test here runs real processes in real time; none may hang the suite.
BOUND = 30.0


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    """An empty directory for the marker files runners write in their children."""
    path = tmp_path / "markers"
    path.mkdir()
    return path


def _job(**fields: object) -> Job:
    now = datetime.now(UTC)
    return Job(id="j-1", task="t", created_at=now, updated_at=now, **fields)


# ---------------------------------------------------------------- B11 / B12


@pytest.mark.parametrize(
    "runner", [tasks.BusyLoop(), tasks.AsyncBusyLoop()], ids=["sync", "async"]
)
@pytest.mark.all_backends
async def test_b11_busy_task_times_out_and_its_child_isgone(
    make_manager: ManagerFactory, runner: object
) -> None:
    """A busy loop with timeout_seconds=1 fails (timeout); its child is gone."""
    registry = TaskRegistry()
    spec = registry.add("cpu_block", runner, isolation="process", timeout_seconds=1)
    manager = await make_manager(registry, worker_count=2)
    async with asyncio.timeout(BOUND):
        await spec.runner.prestart()
        job = await manager.submit("cpu_block")
        pid = await child_pid(manager, job.id)

        failed = await wait_for(manager, job.id, "failed")

    assert failed.error is not None
    assert failed.error.code == ErrorCode.timeout
    assert gone(pid)
    assert spec.runner.pids() == []
    assert failed.assets is None


@pytest.mark.all_backends
async def test_b11_event_loop_answers_while_children_burn_cpu(
    make_manager: ManagerFactory,
) -> None:
    """While two children busy-loop, reads are answered and a quick job finishes."""
    registry = TaskRegistry()
    spec = registry.add("cpu_block", tasks.BusyLoop(), isolation="process")
    registry.add("quick", NoopRunner(sleep_ms=0, stages=1))
    manager = await make_manager(registry, worker_count=3, cancel_grace_seconds=0.2)
    async with asyncio.timeout(BOUND):
        await spec.runner.prestart(children=2)
        blocks = [await manager.submit("cpu_block") for _ in range(2)]
        pids = [await child_pid(manager, job.id) for job in blocks]

        reads = [await manager.get(blocks[0].id) for _ in range(20)]
        quick = await manager.submit("quick")
        done = await wait_for(manager, quick.id, "done")
        still = [await manager.get(job.id) for job in blocks]

        for job in blocks:
            await manager.cancel(job.id)
        ended = [await wait_for(manager, job.id, "canceled") for job in blocks]

    assert all(read.status == JobStatus.running for read in reads)
    assert done.status == JobStatus.done
    assert [job.status for job in still] == [JobStatus.running] * 2
    assert all(job.error and job.error.code == ErrorCode.canceled for job in ended)
    assert all(gone(pid) for pid in pids)


@pytest.mark.all_backends
async def test_b12_timed_out_children_free_their_slots(
    make_manager: ManagerFactory,
) -> None:
    """Four blocking jobs time out, their children are killed, and quick jobs run."""
    registry = TaskRegistry()
    spec = registry.add(
        "block", tasks.SleepySync(), isolation="process", timeout_seconds=1
    )
    registry.add("quick", NoopRunner(sleep_ms=0, stages=1))
    manager = await make_manager(
        registry, worker_count=2, resource_limits=ResourceLimits(max_concurrent_jobs=2)
    )
    async with asyncio.timeout(BOUND):
        await spec.runner.prestart(children=2)
        blocks = [await manager.submit("block", {"seconds": 30}) for _ in range(4)]
        quick = [await manager.submit("quick", priority=10) for _ in range(3)]

        ended = [await wait_for(manager, job.id, "failed") for job in blocks]
        finished = [await wait_for(manager, job.id, "done") for job in quick]
        health = await manager.health()

    assert all(job.error and job.error.code == ErrorCode.timeout for job in ended)
    assert all(job.status == JobStatus.done for job in finished)
    assert health["worker"]["zombies"] == 0
    assert health["ok"]


# ---------------------------------------------------------------- cancel (B19)


@pytest.mark.all_backends
async def test_b19_cancel_of_sleeping_sync_task_ends_canceled_within_grace(
    make_manager: ManagerFactory,
) -> None:
    """A sync task in time.sleep is canceled after the grace; its child is gone."""
    registry = TaskRegistry()
    spec = registry.add("sleepy", tasks.SleepySync(), isolation="process")
    manager = await make_manager(registry, worker_count=1, cancel_grace_seconds=0.5)
    async with asyncio.timeout(BOUND):
        await spec.runner.prestart()
        job = await manager.submit("sleepy")
        pid = await child_pid(manager, job.id)

        requested = await manager.cancel(job.id)
        canceled = await wait_for(manager, job.id, "canceled", timeout=5)

    assert requested.status == JobStatus.running and requested.cancel_requested
    assert canceled.error is not None and canceled.error.code == ErrorCode.canceled
    assert canceled.assets is None
    assert gone(pid)


@pytest.mark.all_backends
async def test_b19_stubborn_async_task_is_stopped_and_its_reservation_freed(
    make_manager: ManagerFactory, tmp_path: Path
) -> None:
    """An async task that ignores cancel is stopped: finally runs, memory is freed."""
    registry = TaskRegistry()
    registry.add(
        "stubborn",
        tasks.StubbornAsync(str(tmp_path)),
        isolation="process",
        resources={"memory_mb": 80},
    )
    registry.add("next", NoopRunner(sleep_ms=0, stages=1), resources={"memory_mb": 80})
    manager = await make_manager(
        registry,
        worker_count=2,
        cancel_grace_seconds=0.3,
        resource_limits=ResourceLimits(max_memory_mb=100),
    )
    async with asyncio.timeout(BOUND):
        job = await manager.submit("stubborn")
        pid = await child_pid(manager, job.id)
        waiting = await manager.submit("next")

        await manager.cancel(job.id)
        canceled = await wait_for(manager, job.id, "canceled", timeout=10)
        admitted = await wait_for(manager, waiting.id, "done")

    assert canceled.error is not None and canceled.error.code == ErrorCode.canceled
    assert (tmp_path / f"finally-{job.id}").exists()
    assert gone(pid)
    assert admitted.status == JobStatus.done


async def test_cooperative_cancel_keeps_the_child_warm(
    make_manager: ManagerFactory,
) -> None:
    """A task that checks for cancel stops by itself; the next job reuses its child."""
    registry = TaskRegistry()
    registry.add("polite", tasks.CooperativeSync(), isolation="process")
    manager = await make_manager(registry, worker_count=1, cancel_grace_seconds=10)
    async with asyncio.timeout(BOUND):
        job = await manager.submit("polite")
        pid = await child_pid(manager, job.id)
        await manager.cancel(job.id)
        canceled = await wait_for(manager, job.id, "canceled")

        again = await manager.submit("polite", {"wait": False})
        done = await wait_for(manager, again.id, "done")

    assert canceled.error is not None and canceled.error.code == ErrorCode.canceled
    assert done.assets is not None and done.assets.custom["pid"] == pid


# ---------------------------------------------------------------- lost children


async def test_child_killed_from_outside_fails_attempt_and_retry_uses_new_child(
    make_manager: ManagerFactory,
) -> None:
    """SIGKILL from outside: worker_lost naming the signal; attempt 2 in a new child."""
    registry = TaskRegistry()
    registry.add(
        "fragile", tasks.DiesOnFirstAttempt(), isolation="process", max_retries=1
    )
    manager = await make_manager(registry, worker_count=1, retry_backoff_seconds=0.01)
    async with asyncio.timeout(BOUND):
        job = await manager.submit("fragile")
        pid = await child_pid(manager, job.id)

        os.kill(pid, signal.SIGKILL)
        done = await wait_for(manager, job.id, "done")

    assert done.attempt == 2
    assert [error.code for error in done.errors] == [ErrorCode.worker_lost]
    assert "SIGKILL" in done.errors[0].message
    assert done.errors[0].type == "ChildProcessLostError"
    assert done.assets is not None
    assert done.assets.custom["pid"] != pid
    assert gone(pid)


async def test_child_exit_past_retries_fails_with_worker_lost(
    make_manager: ManagerFactory,
) -> None:
    """A child that dies with no retries left ends the job failed, worker_lost."""
    registry = TaskRegistry()
    registry.add("fragile", tasks.DiesOnFirstAttempt(), isolation="process")
    manager = await make_manager(registry, worker_count=1)
    async with asyncio.timeout(BOUND):
        job = await manager.submit("fragile")
        pid = await child_pid(manager, job.id)
        os.kill(pid, signal.SIGKILL)
        failed = await wait_for(manager, job.id, "failed")

    assert failed.error is not None
    assert failed.error.code == ErrorCode.worker_lost
    assert str(pid) in failed.error.message


# ---------------------------------------------------------------- warm children


async def test_setup_runs_once_per_child_for_many_jobs(
    make_manager: ManagerFactory, markers: Path
) -> None:
    """Ten jobs run in one child whose setup() ran once; teardown() runs at close."""
    registry = TaskRegistry()
    spec = registry.add("count", tasks.Counting(str(markers)), isolation="process")
    manager = await make_manager(registry, worker_count=1)
    async with asyncio.timeout(BOUND):
        jobs = [await manager.submit("count", {"i": i}) for i in range(10)]
        done = [await wait_for(manager, job.id, "done") for job in jobs]
        await manager.close()

    outputs = [job.assets.custom for job in done if job.assets is not None]
    assert len({out["pid"] for out in outputs}) == 1
    assert {out["setups"] for out in outputs} == {1}
    pid = outputs[0]["pid"]
    assert sorted(p.name for p in markers.iterdir()) == [
        f"setup-{pid}",
        f"teardown-{pid}",
    ]
    assert spec.runner.pids() == []
    assert gone(pid)


async def test_max_jobs_per_child_recycles_the_child(
    make_manager: ManagerFactory, markers: Path
) -> None:
    """With max_jobs_per_child=2, five jobs run in three children, each torn down."""
    registry = TaskRegistry()
    registry.add(
        "count",
        tasks.Counting(str(markers)),
        isolation="process",
        max_jobs_per_child=2,
    )
    manager = await make_manager(registry, worker_count=1)
    async with asyncio.timeout(BOUND):
        pids = []
        for i in range(5):
            job = await manager.submit("count", {"i": i})
            done = await wait_for(manager, job.id, "done")
            assert done.assets is not None
            pids.append(done.assets.custom["pid"])
        await manager.close()

    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
    written = {p.name for p in markers.iterdir()}
    assert written == {
        f"{kind}-{pid}" for pid in set(pids) for kind in ("setup", "teardown")
    }


async def test_cuda_visible_devices_follow_the_jobs_gpus(markers: Path) -> None:
    """The child sees CUDA_VISIBLE_DEVICES of ctx.gpus; other GPUs use another child."""
    runner = ProcessRunner(tasks.Counting(str(markers)))
    try:
        async with asyncio.timeout(BOUND):
            first = await runner.execute(_job(), RunContext(_job(), gpus=[1, 3]))
            again = await runner.execute(_job(), RunContext(_job(), gpus=[1, 3]))
            other = await runner.execute(_job(), RunContext(_job(), gpus=[0]))
            plain = await runner.execute(_job(), RunContext(_job()))
    finally:
        await runner.aclose()

    assert first is not None and again is not None and other is not None
    assert first.custom["cuda"] == "1,3" and first.custom["gpus"] == [1, 3]
    assert first.custom["order"] == "PCI_BUS_ID"
    assert again.custom["pid"] == first.custom["pid"]
    assert other.custom["cuda"] == "0" and other.custom["pid"] != first.custom["pid"]
    assert plain is not None
    assert plain.custom["cuda"] == os.environ.get("CUDA_VISIBLE_DEVICES")


# ---------------------------------------------------------------- relaying


async def test_progress_and_assets_are_relayed_from_the_child(
    make_manager: ManagerFactory,
) -> None:
    """Progress events, attached assets and the returned Assets reach the job."""
    registry = TaskRegistry()
    registry.add("report", tasks.Reporter(), isolation="process")
    manager = await make_manager(registry, worker_count=1)
    async with asyncio.timeout(BOUND):
        job = await manager.submit("report")
        stages = [
            event.job.progress.stage
            async for event in manager.events(job.id)
            if event.kind == "progress"
        ]
        done = await manager.get(job.id)

    assert stages == [Stage.fetch, Stage.infer, Stage.write]
    assert done.status == JobStatus.done
    assert (done.progress.processed, done.progress.total) == (3, 3)
    assert await manager.assets(job.id) == Assets(
        custom={"output": {"href": f"/tmp/{job.id}.json"}}
    )


async def test_error_in_child_keeps_its_type_message_and_traceback(
    make_manager: ManagerFactory,
) -> None:
    """A ValueError raised in the child reads as ValueError, with its traceback."""
    registry = TaskRegistry()
    registry.add("fail", tasks.Failing(), isolation="process", max_retries=1)
    manager = await make_manager(registry, worker_count=1, retry_backoff_seconds=0.01)
    async with asyncio.timeout(BOUND):
        job = await manager.submit("fail", {"n": 7})
        failed = await wait_for(manager, job.id, "failed")

    assert failed.attempt == 2
    assert failed.error is not None
    assert failed.error.code == ErrorCode.execution_error
    assert failed.error.type == "ValueError"
    assert failed.error.message == "bad input 7"
    assert failed.error.traceback is not None
    assert "Raised in the child process" in failed.error.traceback
    assert "_isolation_tasks.py" in failed.error.traceback


@pytest.mark.parametrize(
    ("params", "non_retryable"),
    [({"kind": "final"}, ()), ({"n": 1}, (ValueError,))],
    ids=["NonRetryableError", "declared-type"],
)
async def test_non_retryable_errors_in_child_fail_at_once(
    make_manager: ManagerFactory,
    params: dict[str, object],
    non_retryable: tuple[type[BaseException], ...],
) -> None:
    """NonRetryableError and declared types raised in the child are not retried."""
    registry = TaskRegistry()
    registry.add(
        "fail",
        tasks.Failing(),
        isolation="process",
        max_retries=3,
        non_retryable=non_retryable,
    )
    manager = await make_manager(registry, worker_count=1)
    async with asyncio.timeout(BOUND):
        job = await manager.submit("fail", params)
        failed = await wait_for(manager, job.id, "failed")

    assert failed.attempt == 1
    assert failed.error is not None and not failed.error.retryable


async def test_output_that_is_not_json_fails_the_job(
    make_manager: ManagerFactory,
) -> None:
    """A runner returning a non-JSON value in the child fails without retries."""
    registry = TaskRegistry()
    registry.add("bad", tasks.BadOutput(), isolation="process", max_retries=2)
    manager = await make_manager(registry, worker_count=1)
    async with asyncio.timeout(BOUND):
        job = await manager.submit("bad")
        failed = await wait_for(manager, job.id, "failed")

    assert failed.attempt == 1
    assert failed.error is not None
    assert failed.error.type == "InvalidOutputError"
    assert "output.custom.when" in failed.error.message


async def test_failing_setup_fails_the_attempt_with_its_error(
    make_manager: ManagerFactory,
) -> None:
    """setup() raising in a new child fails the attempt and names the error."""
    registry = TaskRegistry()
    spec = registry.add("broken", tasks.BrokenSetup(), isolation="process")
    manager = await make_manager(registry, worker_count=1)
    async with asyncio.timeout(BOUND):
        job = await manager.submit("broken")
        failed = await wait_for(manager, job.id, "failed")
        with pytest.raises(ProcessIsolationError, match="model file missing"):
            await spec.runner.prestart()

    assert failed.error is not None
    assert failed.error.type == "RuntimeError"
    assert "setup() failed in the child process" in failed.error.message
    assert "model file missing" in failed.error.message


async def test_direct_execute_raises_child_task_error() -> None:
    """Called directly, ProcessRunner raises a ChildTaskError for the child's error."""
    runner = ProcessRunner(tasks.Failing())
    try:
        async with asyncio.timeout(BOUND):
            with pytest.raises(ChildTaskError, match="bad input 3") as caught:
                await runner.execute(_job(params={"n": 3}), RunContext(_job()))
    finally:
        await runner.aclose()

    assert caught.value.remote_type == "builtins.ValueError"
    assert runner.pids() == []


async def test_aclose_stops_children_and_the_runner_stays_usable() -> None:
    """aclose() ends every child; a later job starts a new one."""
    runner = ProcessRunner(tasks.CooperativeSync())
    try:
        async with asyncio.timeout(BOUND):
            first = await runner.prestart(children=2)
            await runner.aclose()
            ended = [gone(pid) for pid in first]
            out = await runner.execute(_job(params={"wait": False}), RunContext(_job()))
    finally:
        await runner.aclose()

    assert ended == [True, True]
    assert out is not None and out.custom["pid"] not in first


# ---------------------------------------------------------------- registration


class _Local:
    def __init__(self) -> None:
        self.lock = object()

    def execute(self, job: Job, ctx: RunContext) -> None:
        return None


def test_registration_refuses_what_a_child_cannot_rebuild() -> None:
    """Local classes, non-JSON attributes and bad options fail at registration."""

    class Inner:
        def execute(self, job: Job, ctx: RunContext) -> None:
            return None

    registry = TaskRegistry()
    with pytest.raises(ConfigurationError, match="inside a function"):
        registry.add("inner", Inner(), isolation="process")
    with pytest.raises(ConfigurationError, match=r"runner\.lock.*setup\(\)"):
        registry.add("local", _Local(), isolation="process")
    with pytest.raises(ConfigurationError, match="init_kwargs"):
        registry.add("kw", _Local(), isolation="process", init_kwargs={"nope": 1})
    with pytest.raises(ConfigurationError, match="isolation for task 'x'"):
        registry.add("x", tasks.Failing(), isolation="fork")
    with pytest.raises(ConfigurationError, match="max_jobs_per_child"):
        registry.add("y", tasks.Failing(), isolation="process", max_jobs_per_child=0)


def test_registration_with_init_kwargs_and_thread_mode() -> None:
    """init_kwargs build the runner in the child; isolation='thread' keeps it as is."""
    registry = TaskRegistry()
    runner = tasks.Failing()

    process = registry.add("p", _Local(), isolation="process", init_kwargs={})
    thread = registry.add("t", runner, isolation="thread")

    assert isinstance(process.runner, ProcessRunner)
    assert process.is_async
    assert thread.runner is runner
    assert process.options["isolation"] == "process"


def test_runner_used_from_a_new_event_loop_replaces_its_children() -> None:
    """Children of a finished event loop are stopped when a new loop uses the runner."""
    runner = ProcessRunner(tasks.CooperativeSync())

    async def run_once() -> int:
        async with asyncio.timeout(BOUND):
            out = await runner.execute(_job(params={"wait": False}), RunContext(_job()))
        assert out is not None
        return int(out.custom["pid"])

    async def run_and_close() -> int:
        try:
            return await run_once()
        finally:
            await runner.aclose()

    first = asyncio.run(run_once())
    second = asyncio.run(run_and_close())

    assert second != first
    assert gone(first) and gone(second)


async def test_run_task_harness_runs_a_process_runner() -> None:
    """The testing harness runs a ProcessRunner: progress recorded, cancel relayed."""
    reporter = ProcessRunner(tasks.Reporter())
    polite = ProcessRunner(tasks.CooperativeSync())
    try:
        async with asyncio.timeout(BOUND):
            done = await run_task(reporter)
            canceled = await run_task(polite, cancel_after_progress=1)
    finally:
        await reporter.aclose()
        await polite.aclose()

    assert done.status == JobStatus.done
    assert [p.stage for p in done.progress] == [Stage.fetch, Stage.infer, Stage.write]
    assert canceled.status == JobStatus.canceled
