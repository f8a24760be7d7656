"""Cases of CASES.md on the embedded default (SQLite store + memory queue), in process.

Crash cases that need a real process to die live in tests/integration/test_crash_*.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from backgrounder import (
    Assets,
    Job,
    JobManager,
    JobStatus,
    NoopRunner,
    ResourceLimits,
    RunContext,
    Stage,
    TaskRegistry,
)
from backgrounder.errors import InvalidParamsError, JobStateError, SubmitError
from backgrounder_testing import FakeClock
from tests.backgrounder.casekit import Probe, drive_until, settle, started
from tests.conftest import ManagerFactory, wait_for


def _crash(manager: JobManager) -> None:
    """Make a manager act as a process that died: no writes, no heartbeats."""
    manager.worker.abandon()
    assert manager._maintenance is not None
    manager._maintenance.cancel()


# ---------------------------------------------------------------- B01


async def test_b01_orphaned_job_is_recovered_within_three_heartbeats(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """A dead worker's job is back within 3 heartbeats, not after its 3600 s timeout."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("sleepy", probe)
    heartbeat = 1.0
    options: dict[str, Any] = {
        "clock": clock,
        "heartbeat_seconds": heartbeat,
        "lease_seconds": 3 * heartbeat,
        "recovery_interval_seconds": heartbeat / 4,
        "retry_backoff_seconds": 0,
    }
    w1 = await make_manager(registry, worker_id="w1", **options)
    job = await w1.submit(
        "sleepy",
        {"name": "s", "block": True, "stage": "infer", "per_attempt": True},
        timeout_seconds=3600,
        max_retries=1,
    )
    await started(probe, "s#1")
    await clock.advance_async(1.5)  # a heartbeat or so, then the crash
    await settle(w1)
    _crash(w1)
    w2 = await make_manager(registry, worker_id="w2", **options)

    taken = await drive_until(
        clock,
        w2,
        job.id,
        lambda j: j.attempt == 2,
        step=0.05,
        # three heartbeats, one recovery pass, and a few steps for its writes
        limit=3 * heartbeat + options["recovery_interval_seconds"] + 0.25,
    )

    assert taken.status in (JobStatus.queued, JobStatus.running)
    assert taken.errors[0].code == "worker_lost"
    assert "w1" in taken.errors[0].message
    assert taken.errors[0].stage == Stage.infer
    await started(probe, "s#2")
    probe.gates["s#2"].set()
    done = await wait_for(w2, job.id, "done")
    assert done.attempt == 2


# ---------------------------------------------------------------- B12


class BlockingSync:
    """A sync runner that blocks its thread until the test releases it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = 0
        self.lock = threading.Lock()

    def execute(self, job: Job, ctx: RunContext) -> None:
        with self.lock:
            self.started += 1
        self.release.wait(60)


@pytest.mark.all_backends
async def test_b12_timed_out_threads_count_as_busy_and_health_says_so(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """Timed-out sync runners keep their slots, and health is not ok while they do."""
    blocking = BlockingSync()
    registry = TaskRegistry()
    registry.add("block", blocking)
    registry.add("quick", NoopRunner(sleep_ms=0))
    manager = await make_manager(registry, clock=clock, worker_count=2)
    try:
        slow = [
            (await manager.submit("block", {"i": i}, timeout_seconds=1)).id
            for i in range(4)
        ]
        quick = [(await manager.submit("quick", {"i": i})).id for i in range(3)]
        for job_id in slow[:2]:
            await wait_for(manager, job_id, "running")

        await clock.advance_async(1.1)
        for job_id in slow[:2]:
            failed = await wait_for(manager, job_id, "failed")
            assert failed.error is not None and failed.error.code == "timeout"
        health = await manager.health()

        assert health["ok"] is False
        assert health["worker"]["zombies"] == 2
        assert "timed out" in health["worker"]["error"]
        for job_id in quick:
            assert (await manager.get(job_id)).status == JobStatus.queued
    finally:
        blocking.release.set()
    for job_id in [*slow[2:], *quick]:
        await wait_for(manager, job_id, "done")
    health = await manager.health()
    assert health["ok"] is True
    assert health["worker"]["zombies"] == 0


# ---------------------------------------------------------------- B13


@pytest.mark.all_backends
async def test_b13_timeout_defaults_none_and_timeout_is_never_canceled(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """Defaults show, None means no limit, 0/-5 are refused, a timeout is a failure."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    registry.add("task-default", probe, timeout_seconds=50)
    manager = await make_manager(
        registry,
        clock=clock,
        worker_count=4,
        default_timeout_seconds=5,
        retry_backoff_seconds=0,
    )
    # (a) omitted: the applied default is shown.
    assert (await manager.submit("probe", {"name": "a"})).timeout_seconds == 5
    assert (await manager.submit("task-default", {"name": "a2"})).timeout_seconds == 50
    # (c) 0 and -5 are refused with a message; nothing is stored.
    before = len((await manager.list(limit=100)).items)
    for bad in (0, -5, "10"):
        with pytest.raises(SubmitError, match="timeout_seconds"):
            await manager.submit("probe", {"name": "c"}, timeout_seconds=bad)
    assert len((await manager.list(limit=100)).items) == before
    # (b) None: no limit, survives 20x the default; a per-job 50 beats default 5.
    forever = await manager.submit(
        "probe", {"name": "b", "block": True}, timeout_seconds=None
    )
    longer = await manager.submit(
        "probe", {"name": "long", "block": True}, timeout_seconds=50
    )
    assert forever.timeout_seconds is None
    await started(probe, "b")
    await started(probe, "long")
    for _ in range(40):
        await clock.advance_async(1)
        await settle(manager, 1)
    assert (await manager.get(longer.id)).status == JobStatus.running
    for _ in range(60):
        await clock.advance_async(1)
        await settle(manager, 1)
    still = await manager.get(forever.id)
    assert still.status == JobStatus.running
    failed_long = await wait_for(manager, longer.id, "failed")
    assert failed_long.error is not None and failed_long.error.code == "timeout"
    probe.gates["b"].set()
    assert (await wait_for(manager, forever.id, "done")).error is None


@pytest.mark.all_backends
async def test_b13_timeout_is_a_retried_failure_and_cancel_is_canceled(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """Over its timeout a job fails (retried while it may); a user cancel cancels."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    manager = await make_manager(
        registry, clock=clock, worker_count=2, retry_backoff_seconds=0
    )
    job = await manager.submit(
        "probe", {"name": "t", "block": True}, timeout_seconds=2, max_retries=1
    )
    final = await drive_until(clock, manager, job.id, lambda j: j.is_terminal, step=0.5)
    assert final.status == JobStatus.failed
    assert final.attempt == 2
    assert [e.code for e in final.errors] == ["timeout", "timeout"]
    assert final.error is not None and final.error.type == "JobTimeoutError"
    assert final.cancel_requested is False

    user = await manager.submit("probe", {"name": "u", "block": True})
    await started(probe, "u")
    await manager.cancel(user.id)
    canceled = await drive_until(clock, manager, user.id, lambda j: j.is_terminal)
    assert canceled.status == JobStatus.canceled
    assert canceled.error is not None and canceled.error.code == "canceled"


# ---------------------------------------------------------------- B15


@pytest.mark.all_backends
async def test_b15_canceled_queued_job_is_never_run(
    make_manager: ManagerFactory,
) -> None:
    """B canceled while A holds the only slot: never runs, no started_at."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    manager = await make_manager(registry, worker_count=1)
    a = await manager.submit("probe", {"name": "A", "block": True})
    await started(probe, "A")
    b = await manager.submit("probe", {"name": "B"})

    assert (await manager.cancel(b.id)).status == JobStatus.canceled
    probe.gates["A"].set()
    await wait_for(manager, a.id, "done")
    c = await manager.submit("probe", {"name": "C"})
    await wait_for(manager, c.id, "done")

    final = await manager.get(b.id)
    assert probe.runs["B"] == 0
    assert (final.status, final.started_at, final.assets) == ("canceled", None, None)


class Counted:
    """Counts its runs, yields a few times, looks for cancel, then returns."""

    def __init__(self) -> None:
        self.runs = 0

    async def execute(self, job: Job, ctx: RunContext) -> dict[str, int]:
        self.runs += 1
        for _ in range(3):
            await asyncio.sleep(0)
        await ctx.check_canceled()
        return {"ok": 1}


async def _b15_rounds(make_manager: ManagerFactory, rounds: int) -> None:
    runner = Counted()
    registry = TaskRegistry()
    registry.add("count", runner)
    manager = await make_manager(registry, worker_count=1)
    rng = random.Random(15)
    outcomes: set[str] = set()
    for _ in range(rounds):
        runs_before = runner.runs
        job = await manager.submit("count")
        for _ in range(rng.randrange(0, 40)):
            await asyncio.sleep(0)
        try:
            answered = await manager.cancel(job.id)
        except JobStateError:
            answered = None
        final = await wait_for(manager, job.id)
        ran = runner.runs > runs_before
        if answered is None:
            assert final.status == JobStatus.done
            outcomes.add("done-409")
        else:
            assert final.status == JobStatus.canceled, "cancel said 200, job ended done"
            assert final.assets is None
            if ran:
                outcomes.add("canceled-after-start")
            else:
                assert final.started_at is None
                outcomes.add("canceled-never-run")
    assert outcomes, "no round ran"


@pytest.mark.all_backends
async def test_b15_cancel_racing_the_claim_never_ends_done(
    make_manager: ManagerFactory,
) -> None:
    """Cancels landing around B's claim: each round ends in one allowed outcome."""
    await _b15_rounds(make_manager, 30)


@pytest.mark.slow
@pytest.mark.all_backends
async def test_b15_cancel_racing_the_claim_never_ends_done_long(
    make_manager: ManagerFactory,
) -> None:
    """The 200-round variant of the cancel/claim race."""
    await _b15_rounds(make_manager, 200)


# ---------------------------------------------------------------- B16


class Cooperative:
    """Checks for cancel every 0.1 s of the job's clock; would run 60 s."""

    async def execute(self, job: Job, ctx: RunContext) -> None:
        for i in range(600):
            await ctx.progress(i / 6, Stage.infer, i, 600)
            await ctx.check_canceled()
            await ctx.clock.sleep(0.1)


@pytest.mark.all_backends
async def test_b16_cancel_gets_through_while_every_slot_is_busy(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """With the only slot busy, cancel returns at once and the next job then runs."""
    registry = TaskRegistry()
    registry.add("coop", Cooperative())
    registry.add("quick", NoopRunner(sleep_ms=0))
    manager = await make_manager(registry, clock=clock, worker_count=1, lease_seconds=3)
    a = await manager.submit("coop")
    queued = [(await manager.submit("quick", {"i": i})).id for i in range(5)]
    running = await wait_for(manager, a.id, "running")
    lease = running.lease_expires_at
    await clock.advance_async(1.05)  # a heartbeat while the worker is full
    assert lease is not None
    # The renewal is a store write on its way (a network round trip on Redis):
    # wait for it, bounded, rather than for a fixed number of loop turns.
    async with asyncio.timeout(5):
        while True:
            renewed = await manager.get(a.id)
            assert renewed.lease_expires_at is not None
            if renewed.lease_expires_at > lease:
                break

    async with asyncio.timeout(5):  # the clock is frozen: nothing may wait on it
        answer = await manager.cancel(a.id)
    assert answer.cancel_requested is True

    canceled = await drive_until(
        clock, manager, a.id, lambda j: j.is_terminal, step=0.1, limit=1.0
    )
    assert canceled.status == JobStatus.canceled
    for job_id in queued:
        await wait_for(manager, job_id, "done")


# ---------------------------------------------------------------- B19


class Stubborn:
    """Awaits plain clock sleeps in a loop, never checks cancel; flags its finally."""

    def __init__(self) -> None:
        self.finally_ran = asyncio.Event()
        self.started = asyncio.Event()

    async def execute(self, job: Job, ctx: RunContext) -> dict[str, str]:
        self.started.set()
        try:
            for _ in range(10_000):
                await ctx.clock.sleep(0.1)
            return {"result": "written"}
        finally:
            self.finally_ran.set()


@pytest.mark.all_backends
async def test_b19_non_cooperative_async_runner_is_canceled_by_force(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """After the grace the runner's task is canceled, nothing stored, memory freed."""
    stubborn = Stubborn()
    registry = TaskRegistry()
    registry.add("stubborn", stubborn, resources={"memory_mb": 80})
    registry.add("next", NoopRunner(sleep_ms=0), resources={"memory_mb": 80})
    manager = await make_manager(
        registry,
        clock=clock,
        worker_count=2,
        cancel_grace_seconds=2,
        resource_limits=ResourceLimits(max_memory_mb=100),
    )
    job = await manager.submit("stubborn")
    async with asyncio.timeout(10):
        await stubborn.started.wait()
    follower = await manager.submit("next")
    await clock.advance_async(0.5)

    await manager.cancel(job.id)
    canceled = await drive_until(
        clock, manager, job.id, lambda j: j.is_terminal, step=0.1, limit=2.5
    )

    assert canceled.status == JobStatus.canceled
    assert stubborn.finally_ran.is_set()
    assert canceled.assets is None
    done = await drive_until(clock, manager, follower.id, lambda j: j.is_terminal)
    assert done.status == JobStatus.done
    assert manager.resources.reserved_memory_mb() == 0


class DeafSync:
    """A sync runner that never looks at cancellation."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()

    def execute(self, job: Job, ctx: RunContext) -> dict[str, str]:
        self.started.set()
        self.release.wait(60)
        return {"result": "written"}


@pytest.mark.all_backends
async def test_b19_sync_thread_ignoring_cancel_is_not_shown_canceled_while_running(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """A thread cannot be stopped: the job stays running with cancel_requested."""
    deaf = DeafSync()
    registry = TaskRegistry()
    registry.add("deaf", deaf)
    manager = await make_manager(
        registry, clock=clock, worker_count=1, cancel_grace_seconds=1
    )
    try:
        job = await manager.submit("deaf")
        await wait_for(manager, job.id, "running")
        answer = await manager.cancel(job.id)
        assert (answer.status, answer.cancel_requested) == ("running", True)

        for _ in range(30):  # 3 s of fake time, three times the grace
            await clock.advance_async(0.1)
            await settle(manager, 1)
        still = await manager.get(job.id)
        assert (still.status, still.cancel_requested) == ("running", True)
        health = await manager.health()
        assert health["worker"]["running"] == 1
    finally:
        deaf.release.set()
    final = await wait_for(manager, job.id, "canceled")
    assert final.assets is None  # the late result is not stored as a success


# ---------------------------------------------------------------- B20


@pytest.mark.all_backends
async def test_b20_explicit_zero_retries_and_zero_priority_are_kept(
    make_manager: ManagerFactory,
) -> None:
    """max_retries=0 over a task default of 5 means one run; priority 0 stays 0."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe, max_retries=5)
    manager = await make_manager(registry, retry_backoff_seconds=0)
    job = await manager.submit(
        "probe", {"name": "z", "fail": True}, max_retries=0, priority=0
    )
    assert (job.max_retries, job.priority) == (0, 0)

    failed = await wait_for(manager, job.id, "failed")

    assert probe.runs["z"] == 1
    assert (failed.attempt, failed.max_retries, failed.priority) == (1, 0, 0)
    default = await manager.submit("probe", {"name": "d", "fail": True})
    assert default.max_retries == 5


# ---------------------------------------------------------------- B22


@pytest.mark.parametrize("path", ["exception", "timeout"])
@pytest.mark.all_backends
async def test_b22_retries_are_bounded_on_every_failure_path(
    make_manager: ManagerFactory, clock: FakeClock, path: str
) -> None:
    """max_retries=2: exactly 3 attempts, then failed; a day later still 3."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    manager = await make_manager(registry, clock=clock, retry_backoff_seconds=0.5)
    params: dict[str, Any] = {"name": "p"}
    params |= {"fail": True} if path == "exception" else {"block": True}
    job = await manager.submit("probe", params, max_retries=2, timeout_seconds=2)

    final = await drive_until(clock, manager, job.id, lambda j: j.is_terminal)
    await clock.advance_async(24 * 3600)
    await settle(manager)
    later = await manager.get(job.id)

    code = "execution_error" if path == "exception" else "timeout"
    assert final.status == JobStatus.failed
    assert (later.status, later.attempt, later.retries) == ("failed", 3, 2)
    assert [e.code for e in later.errors] == [code] * 3
    assert [e.attempt for e in later.errors] == [1, 2, 3]
    assert probe.runs["p"] == 3


# ---------------------------------------------------------------- B24


class LockedError(Exception):
    """An exception with keyword-only arguments, one of them a lock."""

    def __init__(self, *, lock: Any, detail: str) -> None:
        super().__init__(f"resource busy: {detail}")
        self.lock = lock


class UnreadableError(Exception):
    """An exception whose str() itself raises."""

    def __str__(self) -> str:
        raise RuntimeError("no message for you")


class Awkward:
    """Fails or returns in ways that cannot be stored as they are."""

    async def execute(self, job: Job, ctx: RunContext) -> Any:
        kind = job.params["kind"]
        if kind == "locked":
            raise LockedError(lock=threading.Lock(), detail="gpu 0")
        if kind == "unreadable":
            raise UnreadableError()
        return {"set": {1, 2}, "bytes": b"x", "object": object()}[kind]


class AwkwardSync:
    """The same, from a sync runner's thread."""

    def execute(self, job: Job, ctx: RunContext) -> Any:
        kind = job.params["kind"]
        if kind == "locked":
            raise LockedError(lock=threading.Lock(), detail="gpu 0")
        if kind == "unreadable":
            raise UnreadableError()
        return {"set": {1, 2}, "bytes": b"x", "object": object()}[kind]


@pytest.mark.parametrize("task", ["async", "sync"])
@pytest.mark.all_backends
async def test_b24_unserializable_errors_and_results_fail_cleanly(
    make_manager: ManagerFactory, task: str
) -> None:
    """Every such job fails with a readable error; the worker keeps going."""
    registry = TaskRegistry()
    registry.add("async", Awkward())
    registry.add("sync", AwkwardSync())
    registry.add("noop", NoopRunner(sleep_ms=0))
    manager = await make_manager(registry, worker_count=2)
    kinds = ["locked", "unreadable", "set", "bytes", "object"]
    ids = {k: (await manager.submit(task, {"kind": k})).id for k in kinds}

    finals = {k: await wait_for(manager, job_id) for k, job_id in ids.items()}

    for kind, job in finals.items():
        assert job.status == JobStatus.failed, kind
        assert job.assets is None
        assert job.error is not None and job.error.message
        Job.model_validate_json(job.model_dump_json())  # GET serialises fine
    locked = finals["locked"].error
    assert locked is not None
    assert (locked.type, locked.message) == ("LockedError", "resource busy: gpu 0")
    unreadable = finals["unreadable"].error
    assert unreadable is not None and unreadable.type == "UnreadableError"
    assert "could not be read" in unreadable.message
    for kind in ("set", "bytes", "object"):
        error = finals[kind].error
        assert error is not None
        assert error.type == "InvalidOutputError"
        assert error.retryable is False
    after = await manager.submit("noop")
    assert (await wait_for(manager, after.id)).status == JobStatus.done


# ---------------------------------------------------------------- B26


@pytest.mark.all_backends
async def test_b26_priority_order_survives_restart_and_retry(
    make_manager: ManagerFactory,
) -> None:
    """b, d, c, a: higher first, FIFO among equals; -1 and "high" refused."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    api = await make_manager(registry, worker_count=0)
    plan = [("a", 0), ("b", 10), ("c", 5), ("d", 10)]
    ids = [(await api.submit("probe", {"name": n}, priority=p)).id for n, p in plan]
    for bad in (-1, 101, "high", 5.5, True):
        with pytest.raises(SubmitError, match="priority"):
            await api.submit("probe", {"name": "e"}, priority=bad)
    await api.close()

    worker = await make_manager(registry, worker_count=1)  # restored from SQLite
    for job_id in ids:
        await wait_for(worker, job_id, "done")
    assert probe.order == ["b", "d", "c", "a"]


@pytest.mark.all_backends
async def test_b26_a_retried_high_priority_job_keeps_its_priority(
    make_manager: ManagerFactory,
) -> None:
    """A failed priority-90 job's retry runs before an older priority-50 job."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    manager = await make_manager(registry, worker_count=1, retry_backoff_seconds=0)
    x = await manager.submit("probe", {"name": "X", "block": True})
    await started(probe, "X")
    low = await manager.submit("probe", {"name": "L"}, priority=50)
    high = await manager.submit(
        "probe", {"name": "P", "fail_on": [1]}, priority=90, max_retries=1
    )

    probe.gates["X"].set()
    for job_id in (x.id, high.id, low.id):
        await wait_for(manager, job_id, "done")

    assert probe.order == ["X", "P", "P", "L"]
    assert (await manager.get(high.id)).priority == 90


# ---------------------------------------------------------------- B27


@pytest.mark.all_backends
async def test_b27_priority_is_strict_a_low_job_waits_while_high_ones_arrive(
    make_manager: ManagerFactory,
) -> None:
    """Strict priority (documented; no aging): L runs only once no high job waits."""
    probe = Probe()
    registry = TaskRegistry()
    manager: JobManager | None = None
    highs: list[str] = []

    class Chain:
        async def execute(self, job: Job, ctx: RunContext) -> None:
            index = job.params["i"]
            probe.order.append(f"H{index}")
            if index < 20 and manager is not None:
                highs.append((await manager.submit("high", {"i": index + 1})).id)

    registry.add("probe", probe)
    registry.add("high", Chain())
    manager = await make_manager(registry, worker_count=1)
    x = await manager.submit("probe", {"name": "X", "block": True})
    await started(probe, "X")
    low = await manager.submit("probe", {"name": "L"}, priority=0)
    highs.append((await manager.submit("high", {"i": 1}, priority=100)).id)

    probe.gates["X"].set()
    await wait_for(manager, x.id, "done")
    await wait_for(manager, low.id, "done")

    assert probe.order == ["X", *[f"H{i}" for i in range(1, 21)], "L"]


# ---------------------------------------------------------------- B43


@pytest.mark.parametrize("jump", [3600, -3600])
@pytest.mark.all_backends
async def test_b43_wall_clock_jumps_change_no_timeout_or_recovery(
    make_manager: ManagerFactory, clock: FakeClock, jump: float
) -> None:
    """A wall jump at 2 s: no early timeout, no recovery, timeout at 10 s monotonic."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    manager = await make_manager(
        registry, clock=clock, lease_seconds=3, recovery_interval_seconds=0.5
    )
    job = await manager.submit(
        "probe", {"name": "j", "block": True}, timeout_seconds=10
    )
    await started(probe, "j")
    start = clock.monotonic()

    await clock.advance_async(2)
    clock.jump_wall(jump)
    while clock.monotonic() - start < 9.9:
        await clock.advance_async(0.1)
        await settle(manager, 1)
    mid = await manager.get(job.id)
    assert (mid.status, mid.attempt, mid.errors) == ("running", 1, [])
    assert probe.runs["j"] == 1
    await clock.advance_async(0.2)

    failed = await wait_for(manager, job.id, "failed")
    assert failed.error is not None and failed.error.code == "timeout"
    assert [e.code for e in failed.errors] == ["timeout"]


# ---------------------------------------------------------------- B45


class Echo:
    """Returns what it was given."""

    async def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        return {"params": job.params, "types": _types(job.params)}


def _types(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value).__name__


@pytest.mark.parametrize(
    ("params", "path"),
    [
        ({"x": math.nan}, "params.x"),
        ({"a": {"b": [1, math.inf]}}, "params.a.b[1]"),
        ({"when": datetime(2026, 1, 1, tzinfo=UTC)}, "params.when"),
        ({"d": Decimal("1.1")}, "params.d"),
        ({"s": {1, 2}}, "params.s"),
        ({"b": b"x"}, "params.b"),
        ({"t": (1, 2)}, "params.t"),
        ({"deep": {"k": [{"v": object()}]}}, "params.deep.k[0].v"),
        ({1: "int key"}, "params"),
    ],
)
@pytest.mark.all_backends
async def test_b45_non_json_params_are_refused_with_the_key_path(
    make_manager: ManagerFactory, params: dict[Any, Any], path: str
) -> None:
    """A typed error names the offending key path; nothing is stored."""
    registry = TaskRegistry()
    registry.add("echo", Echo())
    manager = await make_manager(registry, worker_count=0)

    with pytest.raises(InvalidParamsError) as caught:
        await manager.submit("echo", params)

    assert caught.value.path == path
    assert path in str(caught.value)
    assert (await manager.list()).items == []


@pytest.mark.parametrize("params", [[1, 2], "text", 3, ("a", 1)])
@pytest.mark.all_backends
async def test_b45_params_that_are_not_an_object_are_refused(
    make_manager: ManagerFactory, params: Any
) -> None:
    """Params must be a JSON object."""
    registry = TaskRegistry()
    registry.add("echo", Echo())
    manager = await make_manager(registry, worker_count=0)

    with pytest.raises(InvalidParamsError, match="JSON object"):
        await manager.submit("echo", params)
    assert (await manager.list()).items == []


@pytest.mark.all_backends
async def test_b45_json_params_reach_the_runner_unchanged(
    make_manager: ManagerFactory,
) -> None:
    """Unicode, nested dicts and integers above 2**53 round-trip exactly."""
    registry = TaskRegistry()
    registry.add("echo", Echo())
    manager = await make_manager(registry)
    params = {
        "text": "naïve café 東京 🚀 \u0000 end",
        "nested": {"a": {"b": {"c": [1, {"d": None}, True, 1.5]}}},
        "big": 2**53 + 1,
        "huge": 2**70,
        "negative": -(2**63),
        "zero_float": 0.0,
    }

    job = await manager.submit("echo", params)
    done = await wait_for(manager, job.id, "done")

    assert done.params == params
    assert done.assets is not None
    assert done.assets.custom["params"] == params
    types = done.assets.custom["types"]
    assert (types["big"], types["huge"], types["negative"]) == ("int", "int", "int")
    assert types["zero_float"] == "float"


# ---------------------------------------------------------------- B29 (in process)


def _store_threads() -> int:
    return sum("_connection_worker_thread" in t.name for t in threading.enumerate())


def _open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


async def test_b29_open_close_cycles_keep_threads_and_fds_flat(
    tmp_path: Path,
) -> None:
    """200 start/close cycles leave the thread and descriptor counts where they were."""
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0))

    async def cycle() -> None:
        manager = JobManager(db_path=tmp_path / "jobs.db", registry=registry)
        async with manager:
            pass

    for _ in range(5):  # warm up lazily created resources
        await cycle()
    threads, fds = _store_threads(), _open_fds()
    for _ in range(200):
        await cycle()

    # Threads of earlier tests (sync runners) may end meanwhile: count the
    # store's connection threads, and see that no descriptor leaked.
    assert _store_threads() == threads
    assert _open_fds() <= fds + 2


class FailingQueue:
    """A queue plugin whose open() raises: a start-up failure after the store."""

    name = "failing"

    async def open(self, clock: Any) -> None:
        raise RuntimeError("queue plugin refused to start")

    async def close(self) -> None:
        return None


async def test_b29_startup_failure_after_the_store_opened_leaves_no_thread(
    tmp_path: Path,
) -> None:
    """The store's connection thread is gone after a failed start."""
    threads = _store_threads()
    manager = JobManager(db_path=tmp_path / "jobs.db", queue=FailingQueue())  # type: ignore[arg-type]

    with pytest.raises(RuntimeError, match="refused to start"):
        await manager.start()

    assert _store_threads() == threads
    assert not manager.started


async def test_b29_dropped_manager_warns(tmp_path: Path) -> None:
    """A manager dropped without close() gives a ResourceWarning naming the fix."""
    manager = JobManager(db_path=tmp_path / "jobs.db", worker_count=0)
    await manager.start()

    with pytest.warns(ResourceWarning, match="close"):
        manager.__del__()
    await manager.close()


@pytest.mark.all_backends
async def test_b15_cancel_of_a_done_job_is_a_conflict(
    make_manager: ManagerFactory,
) -> None:
    """Canceling a done job raises JobStateError; the job stays done."""
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0))
    manager = await make_manager(registry)
    job = await manager.submit("noop")
    await wait_for(manager, job.id, "done")

    with pytest.raises(JobStateError, match="already done"):
        await manager.cancel(job.id)
    assert (await manager.get(job.id)).status == JobStatus.done
    assert (await manager.assets(job.id)) == Assets(custom={"stages": 5})


@pytest.mark.parametrize(
    "ending",
    ["returns", "raises"],
)
async def test_b15_cancel_from_another_process_beats_the_attempts_ending(
    make_manager: ManagerFactory, clock: FakeClock, ending: str
) -> None:
    """A cancel accepted by another process before the worker heard of it still wins.

    The attempt ends (returning, or raising with retries left) before any
    heartbeat tells the worker of the cancel: the job ends canceled, with no
    result stored and no retry run.
    """
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    worker = await make_manager(registry, clock=clock, retry_backoff_seconds=0)
    other = await make_manager(registry, clock=FakeClock(), worker_count=0)
    params: dict[str, Any] = {"name": "j", "block": True}
    if ending == "raises":
        params["fail_on"] = [1]
    job = await worker.submit("probe", params, max_retries=3)
    await started(probe, "j")

    answer = await other.cancel(job.id)
    assert (answer.status, answer.cancel_requested) == ("running", True)
    probe.gates["j"].set()
    final = await wait_for(worker, job.id)

    assert final.status == JobStatus.canceled
    assert final.assets is None
    assert final.attempt == 1
    assert final.error is not None and final.error.code == "canceled"
    assert probe.runs["j"] == 1
