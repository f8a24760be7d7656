"""Resource admission through a running worker: B39 (resources part) and B40.

Every test drives time with a FakeClock and learns what jobs do through events
(the runner reports starts, the manager's event stream reports endings).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import pytest

from backgrounder import Job, JobStatus, RunContext, TaskRegistry
from backgrounder.errors import JobStateError, ResourceRequestError
from backgrounder.hookspecs import hookimpl
from backgrounder.manager import JobManager
from backgrounder.resources import HostReading, ResourceLimits
from backgrounder.worker import Worker
from backgrounder_testing import FakeClock, SimulatedGPUs
from tests.conftest import ManagerFactory, wait_for

GIB = 1024


class Held:
    """A runner held until the test lets each job go; it counts concurrency.

    ``params["mode"]``: "done" (default) ends when released, "raise" raises when
    released, "cooperate" loops on ctx.sleep until canceled, "ignore" waits on
    an event nobody sets (only a forced stop ends it).
    """

    def __init__(self) -> None:
        self.started: asyncio.Queue[tuple[str, list[int]]] = asyncio.Queue()
        self.gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.open_all = asyncio.Event()
        self.stopped: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.running = 0
        self.max_running = 0
        self.per_gpu: Counter[int] = Counter()
        self.max_per_gpu: Counter[int] = Counter()

    async def execute(self, job: Job, ctx: RunContext) -> None:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        for gpu in ctx.gpus:
            self.per_gpu[gpu] += 1
            self.max_per_gpu[gpu] = max(self.max_per_gpu[gpu], self.per_gpu[gpu])
        self.started.put_nowait((job.id, list(ctx.gpus)))
        try:
            mode = job.params.get("mode", "done")
            if mode == "cooperate":
                while True:
                    await ctx.sleep(3600)
            if mode == "ignore":
                await asyncio.Event().wait()
            gate = asyncio.ensure_future(self.gates[job.id].wait())
            every = asyncio.ensure_future(self.open_all.wait())
            try:
                await asyncio.wait({gate, every}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gate.cancel()
                every.cancel()
            if mode == "raise":
                raise RuntimeError("the model ran out of memory")
        finally:
            self.running -= 1
            for gpu in ctx.gpus:
                self.per_gpu[gpu] -= 1
            self.stopped[job.id].set()

    def release(self, job_id: str) -> None:
        self.gates[job_id].set()

    async def next_start(self) -> tuple[str, list[int]]:
        async with asyncio.timeout(5):
            return await self.started.get()


class FakeHost:
    """A host-probe plugin whose memory and CPU the test sets."""

    def __init__(self, total: float = 32000, used: float = 2000, cpu: float = 10.0):
        self.total, self.used, self.cpu = total, used, cpu

    @hookimpl
    def backgrounder_resource_probes(self) -> list[Any]:
        return [self]

    def read_host(self) -> HostReading:
        return HostReading(self.total, self.used, self.total - self.used, self.cpu)

    def read_gpus(self) -> None:
        return None


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (no clock involved), or fail."""
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0)


def reserved(manager: JobManager) -> tuple[int, int, int]:
    """(running jobs, reserved GPU MB, reserved memory MB) as _resources says."""
    snap = manager.resources.snapshot()
    return (
        snap["running_jobs"],
        snap["reserved"]["gpu_memory_mb"],
        snap["reserved"]["memory_mb"],
    )


async def gpu_manager(
    make_manager: ManagerFactory,
    runner: Any,
    clock: FakeClock,
    gpus: list[int] | None = None,
    **options: Any,
) -> JobManager:
    registry = TaskRegistry()
    registry.add("gpu", runner)
    options.setdefault("worker_count", 2)
    return await make_manager(
        registry,
        clock=clock,
        plugins=[SimulatedGPUs(gpus or [16 * GIB])],
        **options,
    )


# ---------------------------------------------------------------- B40


ENDINGS = [
    "done",
    "exception",
    "timeout",
    "cooperative-cancel",
    "forced-cancel",
    "lost-lease",
    "shutdown",
    "crash-and-recovery",
]


@pytest.mark.parametrize("ending", ENDINGS, ids=ENDINGS)
@pytest.mark.all_backends
async def test_b40_reservation_freed_in_every_ending(
    make_manager: ManagerFactory, clock: FakeClock, ending: str
) -> None:
    """After each ending the reservation is 0 and a second 10 GiB job starts.

    One simulated 16 GiB GPU: the second job waits queued (not failed) while the
    first holds 10 GiB, and starts once the first ends, however it ends.
    """
    runner = Held()
    manager = await gpu_manager(make_manager, runner, clock)
    mode = {
        "exception": "raise",
        "cooperative-cancel": "cooperate",
        "forced-cancel": "ignore",
        "timeout": "ignore",
        "lost-lease": "ignore",
        "shutdown": "ignore",
        "crash-and-recovery": "ignore",
    }.get(ending, "done")
    first = await manager.submit(
        "gpu",
        {"mode": mode},
        resources={"gpu_memory_mb": 10 * GIB},
        timeout_seconds=60,
    )
    first_id, first_gpus = await runner.next_start()
    assert (first_id, first_gpus) == (first.id, [0])
    second = await manager.submit("gpu", resources={"gpu_memory_mb": 10 * GIB})
    second_done = False
    await until(lambda: manager.resources.wait_info(second.id) is not None)
    assert (await manager.get(second.id)).status == JobStatus.queued
    assert reserved(manager) == (1, 10 * GIB, 0)

    if ending == "done":
        runner.release(first.id)
        assert (await wait_for(manager, first.id)).status == JobStatus.done
    elif ending == "exception":
        runner.release(first.id)
        failed = await wait_for(manager, first.id)
        assert failed.status == JobStatus.failed
        assert failed.error is not None and failed.error.code == "execution_error"
    elif ending == "timeout":
        await clock.advance_async(60)
        failed = await wait_for(manager, first.id)
        assert failed.error is not None and failed.error.code == "timeout"
    elif ending == "cooperative-cancel":
        await manager.cancel(first.id)
        assert (await wait_for(manager, first.id)).status == JobStatus.canceled
    elif ending == "forced-cancel":
        await manager.cancel(first.id)
        # The grace period starts once the worker sees the request: step the
        # clock by the grace until the runner has been stopped.
        async with asyncio.timeout(5):
            while not runner.stopped[first.id].is_set():
                await clock.advance_async(manager.settings.cancel_grace_seconds)
        assert (await wait_for(manager, first.id)).status == JobStatus.canceled
    elif ending == "lost-lease":
        # Another worker took the job over: the next heartbeat finds out.
        taken = await manager.store.update(
            first.id, {"worker_id": "other-host:1:abc"}, expect_status={"running"}
        )
        assert taken is not None
        await clock.advance_async(manager.settings.heartbeat)
        await runner.stopped[first.id].wait()
    elif ending == "shutdown":
        await manager.worker.stop(drain=False)
        assert (await manager.get(first.id)).status == JobStatus.queued
    elif ending == "crash-and-recovery":
        manager.worker.abandon()

    # The first job's reservation is gone; the waiting second job may already
    # hold its own, but never more than the one device's worth.
    await until(lambda: manager.resources.reservation(first.id) is None)
    assert reserved(manager) in ((0, 0, 0), (1, 10 * GIB, 0))

    if ending in ("shutdown", "crash-and-recovery"):
        # A new worker in the same process takes over with the same manager. One
        # slot, so one claimer: with two, both jobs can be claimed at once and
        # whichever store read answers first reserves the GPU (on a networked
        # store the younger job can win; queue order is claim order, not start
        # order).
        manager.worker = Worker(manager, concurrency=1)
        await manager.worker.start()
    if ending == "crash-and-recovery":
        await clock.advance_async(manager.settings.lease_seconds + 10)
        lost = await wait_for(manager, first.id, "failed")
        assert lost.error is not None and lost.error.code == "worker_lost"

    if ending == "shutdown":
        # Both jobs went back to the queue uncharged: the first stopped mid-run,
        # the second if the stop caught it claimed but not started. Whichever
        # the queue hands out first holds the GPU while the other waits.
        restarted, _ = await runner.next_start()
        if restarted == second.id:
            assert reserved(manager) == (1, 10 * GIB, 0)
            runner.gates[second.id].set()
            assert (await wait_for(manager, second.id)).status == JobStatus.done
            restarted, _ = await runner.next_start()
            second_done = True
        assert restarted == first.id
        assert (await manager.get(first.id)).attempt == 1
        # Cancel the first job (it ignores requests) to free the GPU.
        await manager.cancel(first.id)
        async with asyncio.timeout(5):
            while (await manager.get(first.id)).status != JobStatus.canceled:
                await clock.advance_async(manager.settings.cancel_grace_seconds)

    if not second_done:
        started, _ = await runner.next_start()
        assert started == second.id
        assert (await manager.get(second.id)).status == JobStatus.running
        runner.open_all.set()
        assert (await wait_for(manager, second.id)).status == JobStatus.done
    await until(lambda: manager.resources.running_jobs == 0)
    assert reserved(manager) == (0, 0, 0)
    assert manager.resources.waiting_jobs == 0


@pytest.mark.all_backends
async def test_b40_sync_runner_keeps_reservation_until_its_thread_returns(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """A timed-out sync runner keeps its GPU memory until its thread really stops."""
    go = threading.Event()
    entered = threading.Event()

    class Stubborn:
        def execute(self, job: Job, ctx: RunContext) -> None:
            entered.set()
            go.wait(30)

    runner = Held()
    registry = TaskRegistry()
    registry.add("sync", Stubborn())
    registry.add("gpu", runner)
    manager = await make_manager(
        registry, clock=clock, worker_count=2, plugins=[SimulatedGPUs([16 * GIB])]
    )
    stuck = await manager.submit(
        "sync", resources={"gpu_memory_mb": 10 * GIB}, timeout_seconds=5
    )
    await asyncio.to_thread(entered.wait, 5)
    await clock.advance_async(5)
    failed = await wait_for(manager, stuck.id)
    assert failed.error is not None and failed.error.code == "timeout"

    second = await manager.submit("gpu", resources={"gpu_memory_mb": 10 * GIB})
    await until(lambda: manager.resources.wait_info(second.id) is not None)
    assert reserved(manager) == (1, 10 * GIB, 0)
    assert (await manager.get(second.id)).status == JobStatus.queued

    go.set()
    assert (await runner.next_start())[0] == second.id
    runner.open_all.set()
    await wait_for(manager, second.id, "done")
    await until(lambda: manager.resources.running_jobs == 0)
    assert reserved(manager) == (0, 0, 0)


@pytest.mark.all_backends
async def test_b40_request_larger_than_any_gpu_rejected_at_submit(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """20 GiB on a 16 GiB GPU is refused at submit, naming the device size."""
    manager = await gpu_manager(make_manager, Held(), clock)
    with pytest.raises(ResourceRequestError, match="largest has 16384 MB"):
        await manager.submit("gpu", resources={"gpu_memory_mb": 20 * GIB})
    page = await manager.list()
    assert page.items == []


@pytest.mark.all_backends
async def test_gpu_job_where_no_worker_could_ever_run_it(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """No GPU seen here: on a memory queue only this process's workers take jobs,
    so a GPU job would wait forever and is refused at submit, saying why; on a
    shared queue (Redis) a worker on another host may have GPUs, so it is
    accepted and waits queued."""
    registry = TaskRegistry()
    registry.add("gpu", Held())
    manager = await make_manager(
        registry, clock=clock, plugins=[SimulatedGPUs([])], worker_count=1
    )
    if not manager.queue.shared:
        with pytest.raises(ResourceRequestError, match=r"sees no GPU.*wait forever"):
            await manager.submit("gpu", resources={"gpus": 1})
        assert (await manager.list()).items == []
    else:
        job = await manager.submit("gpu", resources={"gpus": 1})
        assert (await manager.get(job.id)).status == JobStatus.queued


# ---------------------------------------------------------------- acceptance


async def test_gpu_jobs_never_share_a_device_beyond_its_memory(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """Two 10,000 MB GPUs, 6,000 MB jobs: one job per device at once, never more."""
    runner = Held()
    manager = await gpu_manager(
        make_manager, runner, clock, gpus=[10000, 10000], worker_count=4
    )
    with pytest.raises(ResourceRequestError, match="gpu_memory_mb=12000"):
        await manager.submit("gpu", resources={"gpu_memory_mb": 12000})

    jobs = [
        await manager.submit("gpu", {"n": i}, resources={"gpu_memory_mb": 6000})
        for i in range(8)
    ]
    first = await runner.next_start()
    second = await runner.next_start()
    assert {first[1][0], second[1][0]} == {0, 1}  # different devices
    await until(lambda: manager.resources.waiting_jobs == 6)
    assert reserved(manager) == (2, 12000, 0)
    queued = [j for j in jobs if j.id not in (first[0], second[0])]
    for job in queued:
        assert (await manager.get(job.id)).status == JobStatus.queued

    # Let jobs go one at a time; each release admits exactly one waiting job.
    for _ in range(6):
        runner.release(first[0])
        await wait_for(manager, first[0], "done")
        first, second = second, await runner.next_start()
        assert first[1] != second[1]
    runner.open_all.set()
    for job in jobs:
        assert (await wait_for(manager, job.id)).status == JobStatus.done
    assert max(runner.max_per_gpu.values()) == 1
    assert set(runner.max_per_gpu) == {0, 1}
    await until(lambda: manager.resources.running_jobs == 0)
    assert reserved(manager) == (0, 0, 0)


async def test_gpu_reservations_return_to_zero_after_mixed_endings(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """Failures, timeouts and cancels over many GPU jobs leave nothing reserved."""
    runner = Held()
    manager = await gpu_manager(
        make_manager, runner, clock, gpus=[10000, 10000], worker_count=4
    )
    modes = ["raise", "done", "ignore", "cooperate"] * 3
    jobs = [
        await manager.submit(
            "gpu",
            {"mode": m},
            resources={"gpu_memory_mb": 6000},
            timeout_seconds=30 if m == "ignore" else None,
        )
        for m in modes
    ]
    runner.open_all.set()
    pending = {j.id for j in jobs}
    while pending:
        job_id, _ = await runner.next_start()
        job = await manager.get(job_id)
        if job.params["mode"] == "cooperate":
            await manager.cancel(job_id)
        elif job.params["mode"] == "ignore":
            await clock.advance_async(30)
        await wait_for(manager, job_id)
        pending.discard(job_id)
    ends = Counter([(await manager.get(j.id)).status for j in jobs])
    assert ends == {"failed": 6, "done": 3, "canceled": 3}
    assert runner.max_per_gpu[0] == runner.max_per_gpu[1] == 1
    await until(lambda: manager.resources.running_jobs == 0)
    assert reserved(manager) == (0, 0, 0)
    assert manager.resources.waiting_jobs == 0


async def test_max_concurrent_jobs_holds_under_load(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """40 jobs on 8 slots with max_concurrent_jobs=3: never more than 3 at once."""
    runner = Held()
    registry = TaskRegistry()
    registry.add("work", runner)
    manager = await make_manager(
        registry,
        clock=clock,
        worker_count=8,
        resource_limits=ResourceLimits(max_concurrent_jobs=3),
    )
    jobs = [await manager.submit("work", {"n": i}) for i in range(40)]
    for _ in range(3):
        await runner.next_start()
    assert manager.resources.running_jobs == 3
    runner.open_all.set()
    for job in jobs:
        assert (await wait_for(manager, job.id)).status == JobStatus.done
    assert runner.max_running == 3
    await until(lambda: manager.resources.running_jobs == 0)


async def test_memory_limit_and_probe_gate_starts(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """max_memory_mb and the host's free memory (as probed) decide who starts."""
    runner = Held()
    host = FakeHost(total=32000, used=2000)
    registry = TaskRegistry()
    registry.add("work", runner)
    manager = await make_manager(
        registry,
        clock=clock,
        worker_count=4,
        plugins=[host],
        resource_limits=ResourceLimits(max_memory_mb=8000),
    )
    with pytest.raises(ResourceRequestError, match="max_memory_mb=8000"):
        await manager.submit("work", resources={"memory_mb": 9000})

    big = await manager.submit("work", resources={"memory_mb": 5000})
    assert (await runner.next_start())[0] == big.id
    other = await manager.submit("work", resources={"memory_mb": 5000})
    small = await manager.submit("work", resources={"memory_mb": 2000})
    assert (await runner.next_start())[0] == small.id  # passes the waiting one
    info = manager.resources.wait_info(other.id)
    assert info is not None and "max_memory_mb" in info.reason
    assert reserved(manager) == (2, 0, 7000)

    # The host fills up (another program): the limit alone would admit it now.
    host.used = 29000
    runner.release(big.id)
    await wait_for(manager, big.id, "done")
    await clock.advance_async(manager.settings.poll_seconds)
    assert (await manager.get(other.id)).status == JobStatus.queued
    info = manager.resources.wait_info(other.id)
    assert info is not None and "host memory" in info.reason

    host.used = 2000
    await clock.advance_async(manager.settings.poll_seconds)
    assert (await runner.next_start())[0] == other.id
    runner.open_all.set()
    await wait_for(manager, other.id, "done")
    await wait_for(manager, small.id, "done")
    await until(lambda: manager.resources.running_jobs == 0)
    assert reserved(manager) == (0, 0, 0)


async def test_cpu_limit_gates_starts_on_probe_reading(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """While the probed CPU is above max_cpu_percent, jobs wait queued."""
    runner = Held()
    host = FakeHost(cpu=97.0)
    registry = TaskRegistry()
    registry.add("work", runner)
    manager = await make_manager(
        registry,
        clock=clock,
        worker_count=2,
        plugins=[host],
        resource_limits=ResourceLimits(max_cpu_percent=80),
    )
    job = await manager.submit("work")
    await until(lambda: manager.resources.wait_info(job.id) is not None)
    await clock.advance_async(manager.settings.poll_seconds)
    assert (await manager.get(job.id)).status == JobStatus.queued
    host.cpu = 40.0
    await clock.advance_async(manager.settings.poll_seconds)
    assert (await runner.next_start())[0] == job.id
    runner.open_all.set()
    await wait_for(manager, job.id, "done")


async def test_small_jobs_pass_a_waiting_gpu_job(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """A GPU job that does not fit yet lets later small jobs run, then starts."""
    runner = Held()
    manager = await gpu_manager(make_manager, runner, clock, gpus=[10000])
    big = await manager.submit("gpu", resources={"gpu_memory_mb": 8000})
    assert (await runner.next_start())[0] == big.id
    waiting = await manager.submit("gpu", resources={"gpu_memory_mb": 8000})
    smalls = [
        await manager.submit("gpu", resources={"gpu_memory_mb": 1000}) for _ in range(3)
    ]
    for _ in smalls:
        small_id, _ = await runner.next_start()
        assert small_id in {small.id for small in smalls}
        runner.release(small_id)
        await wait_for(manager, small_id, "done")
    assert (await manager.get(waiting.id)).status == JobStatus.queued
    runner.release(big.id)
    assert (await runner.next_start())[0] == waiting.id
    runner.release(waiting.id)
    await wait_for(manager, waiting.id, "done")
    await until(lambda: manager.resources.running_jobs == 0)


async def test_task_default_request_applies_and_canceled_waiter_is_forgotten(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """A runner's ``resources`` attribute is the default; a canceled waiter is gone."""
    runner = Held()
    runner.resources = {"gpu_memory_mb": 9000}  # type: ignore[attr-defined]
    manager = await gpu_manager(make_manager, runner, clock, gpus=[10000])
    first = await manager.submit("gpu")
    assert first.resources is not None and first.resources.gpu_memory_mb == 9000
    await runner.next_start()
    second = await manager.submit("gpu")
    await until(lambda: manager.resources.wait_info(second.id) is not None)
    canceled = await manager.cancel(second.id)
    assert canceled.status == JobStatus.canceled
    assert manager.resources.waiting_jobs == 0
    runner.open_all.set()
    await wait_for(manager, first.id, "done")
    await until(lambda: manager.resources.running_jobs == 0)
    assert (await manager.get(second.id)).status == JobStatus.canceled


@pytest.mark.all_backends
async def test_b39_resource_figures_return_to_zero_after_many_jobs(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """150 jobs of mixed endings leave no reservation and no waiter behind."""
    runner = Held()
    runner.open_all.set()
    manager = await gpu_manager(
        make_manager, runner, clock, gpus=[10000, 10000], worker_count=4
    )
    jobs = []
    for i in range(150):
        mode = "raise" if i % 3 == 0 else "done"
        jobs.append(
            await manager.submit(
                "gpu", {"mode": mode, "i": i}, resources={"gpu_memory_mb": 3000}
            )
        )
    for job in jobs[::7]:
        with contextlib.suppress(JobStateError):  # it may have ended already
            await manager.cancel(job.id)
    for job in jobs:
        await wait_for(manager, job.id)
    await until(lambda: manager.resources.running_jobs == 0)
    assert reserved(manager) == (0, 0, 0)
    assert manager.resources.waiting_jobs == 0
    assert max(runner.max_per_gpu.values()) <= 3


async def test_starving_job_is_not_passed_by_newcomers(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """After starvation_seconds a waiting job holds its memory against newcomers."""
    runner = Held()
    registry = TaskRegistry()
    registry.add("work", runner)
    manager = await make_manager(
        registry,
        clock=clock,
        worker_count=4,
        plugins=[FakeHost()],
        resource_limits=ResourceLimits(max_memory_mb=10000),
    )
    a = await manager.submit("work", resources={"memory_mb": 4000})
    b = await manager.submit("work", resources={"memory_mb": 4000})
    await runner.next_start()
    await runner.next_start()
    big = await manager.submit("work", resources={"memory_mb": 8000})
    await until(lambda: manager.resources.wait_info(big.id) is not None)
    early = await manager.submit("work", resources={"memory_mb": 1000})
    assert (await runner.next_start())[0] == early.id  # passes before starvation
    runner.release(early.id)
    await wait_for(manager, early.id, "done")

    await clock.advance_async(manager.resources.starvation_seconds)
    late = await manager.submit("work", resources={"memory_mb": 1000})
    await until(lambda: manager.resources.wait_info(late.id) is not None)
    info = manager.resources.wait_info(late.id)
    assert info is not None and f"held back for job {big.id}" in info.reason

    runner.release(a.id)
    await wait_for(manager, a.id, "done")
    assert (await manager.get(late.id)).status == JobStatus.queued
    runner.release(b.id)
    assert (await runner.next_start())[0] == big.id
    assert (await runner.next_start())[0] == late.id  # 8,000 + 1,000 fit together
    runner.open_all.set()
    for job in (big, late):
        await wait_for(manager, job.id, "done")
    await until(lambda: manager.resources.running_jobs == 0)
    assert manager.resources.waiting_jobs == 0
