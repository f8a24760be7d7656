"""Random interleavings of the job lifecycle, checked against its invariants.

A hypothesis state machine drives a JobManager without workers of its own
(``worker_count=0``) on a fresh store/queue pair and a FakeClock. Two manual
workers do what ``backgrounder.worker.Worker`` does, one step at a time, through
the public store, queue and manager calls: claim (queue claim, compare-and-set
queued to running with a lease, ack), heartbeat, progress, done, fail, notice a
cancel, and crash (forget everything). Around them the machine submits (with
repeated idempotency keys), cancels, retries, moves the clock and lets leases
run out. After every step it checks the invariants listed in ``_check``.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Awaitable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from backgrounder import JobManager, JobStatus, NoopRunner, TaskRegistry
from backgrounder.errors import IdempotencyConflictError, JobStateError
from backgrounder.models import ErrorCode, ErrorInfo, Job, Progress, Stage
from backgrounder.resources.manager import Reservation
from backgrounder_testing import FakeClock
from tests.reliability.backends import BACKEND_PARAMS, Backend

T = TypeVar("T")

LEASE = 30.0
KEYS = ["k1", "k2", "k3"]
TERMINAL = {JobStatus.done, JobStatus.failed, JobStatus.canceled}

#: Figures of the runs in this process, printed by the tests (pytest -s).
STATS = {"examples": 0, "steps": 0}


class ManualWorker:
    """What one worker believes: the attempts it runs and the ids it claimed."""

    def __init__(self, worker_id: str) -> None:
        self.id = worker_id
        self.jobs: dict[str, Job] = {}
        self.claims: list[str] = []
        self.reservations: dict[str, Reservation] = {}

    def owned(self, index: int) -> Job:
        """Return one of the jobs this worker runs, by a drawn index.

        Ids are random, so they are taken in the order the worker got them: a
        replayed example must pick the same job.
        """
        ids = list(self.jobs)
        return self.jobs[ids[index % len(ids)]]


class LifecycleMachine(RuleBasedStateMachine):
    """The job lifecycle on one store/queue pair; subclassed per backend."""

    backend: ClassVar[Backend]

    def __init__(self) -> None:
        super().__init__()
        STATS["examples"] += 1
        self.loop = asyncio.new_event_loop()
        self.folder = Path(tempfile.mkdtemp(prefix="bg-lifecycle-"))
        self.clock = FakeClock()
        store, queue = self.backend.make(self.folder)
        registry = TaskRegistry()
        registry.add("work", NoopRunner(sleep_ms=0))
        self.manager = JobManager(
            store=store,
            queue=queue,
            registry=registry,
            clock=self.clock,
            worker_count=0,
            lease_seconds=LEASE,
            # The machine runs recovery itself, as a step: no background pass.
            recovery_interval_seconds=1e9,
            retry_backoff_seconds=1.0,
        )
        self.workers = [ManualWorker("w1"), ManualWorker("w2")]
        self.ids: list[str] = []
        self.by_key: dict[str, str] = {}
        self.seen: dict[str, Job] = {}
        self.retried: set[str] = set()
        self.lapsed: set[str] = set()
        self.cancel_answered: dict[str, int] = {}
        self.replays = 0

    def run(self, step: Awaitable[T]) -> T:
        """Run one awaitable on the machine's loop."""
        return self.loop.run_until_complete(step)

    def teardown(self) -> None:
        try:
            if self.manager.started:
                self.run(self.manager.close(drain=False))
            self.run(self.backend.cleanup(self.manager.store, self.manager.queue))
        finally:
            self.loop.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    @initialize()
    def start(self) -> None:
        self.run(self.manager.start())

    # ------------------------------------------------------------ helpers

    async def _get(self, job_id: str) -> Job:
        job = await self.manager.store.get(job_id)
        assert job is not None, f"job {job_id} is not readable"
        return job

    def _drop(self, worker: ManualWorker, job_id: str) -> None:
        """The worker lets go of an attempt and its reservation."""
        worker.jobs.pop(job_id, None)
        reservation = worker.reservations.pop(job_id, None)
        self.manager.resources.release(reservation)

    def _pick(self, index: int) -> str:
        return self.ids[index % len(self.ids)]

    async def _start(self, worker: ManualWorker, job_id: str) -> None:
        """Compare-and-set a claimed id from queued to running, then ack it."""
        before = await self._get(job_id)
        now = self.clock.now()
        job = await self.manager.store.update(
            job_id,
            {
                "status": JobStatus.running,
                "worker_id": worker.id,
                "started_at": now,
                "finished_at": None,
                "run_after": None,
                "lease_expires_at": now + timedelta(seconds=LEASE),
            },
            expect_status={JobStatus.queued},
        )
        await self.manager.queue.ack(job_id)
        if before.status != JobStatus.queued:
            assert job is None, f"job {job_id} started from {before.status}"
            assert await self._get(job_id) == before
            return
        assert job is not None
        assert job.status == JobStatus.running
        if job_id in (await self.backend.inspect(self.manager.queue)).waiting:
            # A claim that lapsed and was put back, then used anyway, starts the
            # job while the put-back id still waits: the next claim of that id
            # finds the job running and drops it (a wasted claim, nothing lost).
            self.lapsed.add(job_id)
        assert (job.worker_id, job.attempt) == (worker.id, before.attempt)
        self._drop(worker, job_id)
        reservation = self.manager.resources.try_reserve(job.id, job.resources)
        assert reservation is not None
        worker.jobs[job_id] = job
        worker.reservations[job_id] = reservation

    async def _claim(self, worker: ManualWorker) -> str | None:
        job_id = await self.manager.queue.claim(
            worker_id=worker.id, lease_seconds=LEASE, timeout_seconds=0
        )
        self.lapsed.discard(job_id or "")
        return job_id

    async def _cas(
        self, worker: ManualWorker, job: Job, fields: dict[str, Any]
    ) -> Job | None:
        """Write as the worker does, compare-and-set on (running, attempt, worker).

        The write must land exactly when the worker still owns the attempt, and
        change nothing at all when it does not.
        """
        before = await self._get(job.id)
        owns = (
            before.status == JobStatus.running
            and before.attempt == job.attempt
            and before.worker_id == worker.id
        )
        written = await self.manager.store.update(
            job.id,
            fields,
            expect_status={JobStatus.running},
            expect_attempt=job.attempt,
            expect_worker=worker.id,
        )
        after = await self._get(job.id)
        if not owns:
            assert written is None, f"stale write by {worker.id} landed on {job.id}"
            assert after == before, f"stale write by {worker.id} changed {job.id}"
            self._drop(worker, job.id)
            return None
        assert written is not None, f"{worker.id}'s write on {job.id} was refused"
        assert written == after
        for name, value in fields.items():
            assert _same(getattr(after, name), value), name
        assert after.cancel_requested == before.cancel_requested
        return after

    # ------------------------------------------------------------ API side

    @rule(
        priority=st.integers(0, 100),
        max_retries=st.integers(0, 2),
        key=st.one_of(st.none(), st.sampled_from(KEYS)),
    )
    def submit(self, priority: int, max_retries: int, key: str | None) -> None:
        job, created = self.run(
            self.manager.submit_or_get(
                "work",
                {"key": key},
                priority=priority,
                max_retries=max_retries,
                idempotency_key=key,
            )
        )
        if key is not None and key in self.by_key:
            assert not created and job.id == self.by_key[key]
            self.replays += 1
            return
        assert created and job.status == JobStatus.queued and job.attempt == 1
        if key is not None:
            self.by_key[key] = job.id
        self.ids.append(job.id)
        self.seen[job.id] = job

    @precondition(lambda self: self.by_key)
    @rule(key=st.sampled_from(KEYS))
    def submit_conflicting(self, key: str) -> None:
        """A used key with other params is refused and makes no job."""
        if key not in self.by_key:
            return
        with pytest.raises(IdempotencyConflictError):
            self.run(
                self.manager.submit(
                    "work", {"key": key, "other": 1}, idempotency_key=key
                )
            )

    @precondition(lambda self: self.ids)
    @rule(index=st.integers(0, 1000))
    def cancel(self, index: int) -> None:
        job_id = self._pick(index)
        before = self.run(self._get(job_id))
        if before.status in (JobStatus.done, JobStatus.failed):
            with pytest.raises(JobStateError):
                self.run(self.manager.cancel(job_id))
            return
        after = self.run(self.manager.cancel(job_id))
        assert after == self.run(self._get(job_id))
        if before.status == JobStatus.canceled:
            assert after == before
        elif before.status == JobStatus.queued:
            assert after.status == JobStatus.canceled
            assert after.error is not None and after.error.code == ErrorCode.canceled
        else:
            assert after.status == JobStatus.running
            assert after.attempt == before.attempt and after.cancel_requested
            self.cancel_answered[job_id] = after.attempt

    @precondition(lambda self: self.ids)
    @rule(index=st.integers(0, 1000))
    def retry(self, index: int) -> None:
        job_id = self._pick(index)
        before = self.run(self._get(job_id))
        if before.status not in (JobStatus.failed, JobStatus.canceled):
            with pytest.raises(JobStateError):
                self.run(self.manager.retry(job_id))
            return
        after = self.run(self.manager.retry(job_id))
        self.retried.add(job_id)
        self.cancel_answered.pop(job_id, None)
        assert after.status == JobStatus.queued
        assert after.attempt == before.attempt + 1
        assert after.retries == 0 and not after.cancel_requested
        assert after.errors == before.errors

    @rule(seconds=st.floats(0.1, 5.0))
    def tick(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def expire_leases(self) -> None:
        """Let every lease run out, then run the manager's recovery pass."""
        running = self.run(
            self.manager.store.list(status=JobStatus.running, limit=len(self.ids) + 1)
        )
        claimed = self.run(self.backend.inspect(self.manager.queue)).claimed
        self.clock.advance(LEASE + 1)
        recovered = self.run(self.manager.recover_expired())
        self.lapsed |= set(claimed)
        assert recovered == len(running.items)
        for job in running.items:
            after = self.run(self._get(job.id))
            assert after.error is not None
            if job.retries < job.max_retries and job.cancel_requested:
                # The accepted cancel wins over the retry the lost lease earned.
                assert after.status == JobStatus.canceled
                assert after.error.code == ErrorCode.canceled
                assert "worker_lost" in after.error.message
                assert after.attempt == job.attempt
                continue
            assert after.error.code == ErrorCode.worker_lost
            if job.retries < job.max_retries:
                assert after.status == JobStatus.queued
                assert after.attempt == job.attempt + 1
            else:
                assert after.status == JobStatus.failed
                assert after.attempt == job.attempt

    # ------------------------------------------------------------ workers

    @rule(w=st.integers(0, 1))
    def claim(self, w: int) -> None:
        """Claim and start in one go, as Worker._claim_one does."""
        worker = self.workers[w]
        job_id = self.run(self._claim(worker))
        if job_id is not None:
            self.run(self._start(worker, job_id))

    @rule(w=st.integers(0, 1))
    def claim_only(self, w: int) -> None:
        """Take an id from the queue and stop there, before the store write."""
        worker = self.workers[w]
        job_id = self.run(self._claim(worker))
        if job_id is not None:
            worker.claims.append(job_id)

    @precondition(lambda self: any(w.claims for w in self.workers))
    @rule(w=st.integers(0, 1))
    def start_claimed(self, w: int) -> None:
        worker = self.workers[w]
        if not worker.claims:
            worker = self.workers[1 - w]
        self.run(self._start(worker, worker.claims.pop(0)))

    @precondition(lambda self: any(w.jobs for w in self.workers))
    @rule(w=st.integers(0, 1), index=st.integers(0, 1000))
    def heartbeat(self, w: int, index: int) -> None:
        worker = self._busy(w)
        job = worker.owned(index)
        expires = self.clock.now() + timedelta(seconds=LEASE)
        self.run(self._cas(worker, job, {"lease_expires_at": expires}))

    @precondition(lambda self: any(w.jobs for w in self.workers))
    @rule(
        w=st.integers(0, 1),
        index=st.integers(0, 1000),
        percent=st.floats(0, 100),
        stage=st.sampled_from(list(Stage)),
    )
    def progress(self, w: int, index: int, percent: float, stage: Stage) -> None:
        worker = self._busy(w)
        job = worker.owned(index)
        progress = Progress(percent=percent, stage=stage, updated_at=self.clock.now())
        self.run(self._cas(worker, job, {"progress": progress}))

    @precondition(lambda self: any(w.jobs for w in self.workers))
    @rule(w=st.integers(0, 1), index=st.integers(0, 1000))
    def finish_done(self, w: int, index: int) -> None:
        worker = self._busy(w)
        job = worker.owned(index)
        fields = {
            "status": JobStatus.done,
            "finished_at": self.clock.now(),
            "error": None,
            "lease_expires_at": None,
        }
        if self.run(self._cas(worker, job, fields)) is not None:
            self._drop(worker, job.id)

    @precondition(lambda self: any(w.jobs for w in self.workers))
    @rule(
        w=st.integers(0, 1),
        index=st.integers(0, 1000),
        code=st.sampled_from([ErrorCode.execution_error, ErrorCode.timeout]),
        retryable=st.booleans(),
    )
    def fail(self, w: int, index: int, code: ErrorCode, retryable: bool) -> None:
        worker = self._busy(w)
        job = worker.owned(index)
        before = self.run(self._get(job.id))
        owns = (
            before.status == JobStatus.running
            and before.attempt == job.attempt
            and before.worker_id == worker.id
        )
        error = ErrorInfo(
            code=code,
            message="the runner failed",
            type="RuntimeError",
            retryable=retryable,
            attempt=job.attempt,
        )
        updated = self.run(
            self.manager.finish_attempt(job, error=error, worker_id=worker.id)
        )
        after = self.run(self._get(job.id))
        self._drop(worker, job.id)
        if not owns:
            assert updated is None and after == before
            return
        assert updated == after
        if retryable and job.retries < job.max_retries and before.cancel_requested:
            # The accepted cancel wins over the retry: canceled, naming the error.
            assert after.status == JobStatus.canceled
            assert after.attempt == job.attempt
            assert after.errors[:-1] == before.errors
            assert after.errors[-1].code == ErrorCode.canceled
            assert error.message in after.errors[-1].message
            return
        assert after.errors == [*before.errors, error]
        if retryable and job.retries < job.max_retries:
            assert after.status == JobStatus.queued
            assert after.attempt == job.attempt + 1
            assert after.retries == job.retries + 1
        else:
            assert after.status == JobStatus.failed
            assert after.attempt == job.attempt

    @precondition(lambda self: any(w.jobs for w in self.workers))
    @rule(w=st.integers(0, 1), index=st.integers(0, 1000))
    def notice_cancel(self, w: int, index: int) -> None:
        """The worker saw cancel_requested and writes its attempt canceled."""
        worker = self._busy(w)
        job = worker.owned(index)
        if not self.run(self._get(job.id)).cancel_requested:
            return
        fields = {
            "status": JobStatus.canceled,
            "finished_at": self.clock.now(),
            "error": ErrorInfo(
                code=ErrorCode.canceled,
                message="canceled by request",
                attempt=job.attempt,
            ),
            "lease_expires_at": None,
        }
        if self.run(self._cas(worker, job, fields)) is not None:
            self._drop(worker, job.id)

    @rule(w=st.integers(0, 1))
    def crash(self, w: int) -> None:
        """The worker dies: it forgets its attempts and claims."""
        worker = self.workers[w]
        for job_id in list(worker.jobs):
            self._drop(worker, job_id)
        worker.claims.clear()

    def _busy(self, w: int) -> ManualWorker:
        worker = self.workers[w]
        return worker if worker.jobs else self.workers[1 - w]

    # ------------------------------------------------------------ invariants

    @invariant()
    def invariants_hold(self) -> None:
        if not self.manager.started:
            return
        STATS["steps"] += 1
        self.run(self._check())
        self.retried.clear()

    async def _check(self) -> None:
        manager = self.manager
        store = manager.store
        # Every job is in exactly one state and readable.
        where: dict[str, JobStatus] = {}
        for status in JobStatus:
            page = await store.list(status=status, limit=len(self.ids) + 1)
            for job in page.items:
                assert job.id not in where, f"job {job.id} listed twice"
                where[job.id] = status
        assert set(where) == set(self.ids)
        # Counts by status add up to the submits less the key replays.
        counts = await store.count_by_status()
        assert sum(counts.values()) == len(self.ids)
        assert all(counts[s] == list(where.values()).count(s) for s in JobStatus)
        for job_id in self.ids:
            job = await self._get(job_id)
            assert job.status == where[job_id]
            self._check_job(job, self.seen[job_id])
            self.seen[job_id] = job
        # The queue holds each queued job once, and only queued jobs.
        view = await self.backend.inspect(manager.queue)
        assert not view.duplicates(), f"ids in the queue twice: {view.duplicates()}"
        assert not view.lost, f"ids the queue can never hand out: {view.lost}"
        queued = {j for j, s in where.items() if s == JobStatus.queued}
        # An id can wait without its job being queued only when a claim of it
        # lapsed after the job left queued (canceled while claimed, say): the
        # queue cannot know, and the next claim of it changes nothing (_start).
        stale = set(view.waiting) - queued
        assert stale <= self.lapsed, f"non-queued jobs wait in the queue: {stale}"
        missing = queued - set(view.waiting) - set(view.claimed)
        assert not missing, f"queued jobs missing from the queue: {sorted(missing)}"
        # Reservations are exactly the attempts workers hold (so zero when none
        # does), even when two attempts of one job are held at once.
        held = sum(len(w.reservations) for w in self.workers)
        assert manager.resources.running_jobs == held

    def _check_job(self, job: Job, before: Job) -> None:
        if before.status in TERMINAL and job != before:
            assert job.id in self.retried, (
                f"terminal job {job.id} ({before.status}) changed to {job.status} "
                "without a retry"
            )
        assert job.attempt >= before.attempt, f"job {job.id}'s attempt went down"
        if job.id in self.cancel_answered:
            # A cancel the API accepted is never undone by a new attempt: only a
            # manual retry runs the job again.
            assert job.attempt == self.cancel_answered[job.id], (
                f"job {job.id} was queued again after its cancel was accepted"
            )
        if (
            before.cancel_requested
            and job.status == before.status == JobStatus.running
            and job.attempt == before.attempt
        ):
            assert job.cancel_requested, f"job {job.id} lost its cancel request"
        assert 0 <= job.retries <= job.max_retries
        if job.status == JobStatus.running:
            assert job.worker_id is not None and job.lease_expires_at is not None
        else:
            assert job.lease_expires_at is None
        if job.status in TERMINAL:
            assert job.finished_at is not None
        if job.status == JobStatus.failed:
            assert job.error is not None and job.errors
        if job.status == JobStatus.queued:
            assert job.worker_id is None and not job.cancel_requested


def _same(stored: Any, written: Any) -> bool:
    """Compare a stored value with the one written (times to the millisecond)."""
    if isinstance(written, datetime) and isinstance(stored, datetime):
        return abs(stored - written) < timedelta(milliseconds=1)
    return bool(stored == written)


def machine_for(backend: Backend) -> type[LifecycleMachine]:
    """Return the state machine bound to one store/queue pair."""
    return type(
        f"LifecycleMachine_{backend.name.replace('-', '_')}",
        (LifecycleMachine,),
        {"backend": backend},
    )


def _run(backend: Backend, *, examples: int, steps: int) -> None:
    before = dict(STATS)
    run_state_machine_as_test(  # type: ignore[no-untyped-call]
        machine_for(backend),
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
            # Shrinking a failure of this machine can take many minutes; report
            # the failing run as found, within the test's time limit.
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
        ),
    )
    ran = {k: STATS[k] - before[k] for k in STATS}
    print(
        f"\nlifecycle state machine on {backend.name}: {ran['examples']} examples, "
        f"{ran['steps']} checked steps"
    )
    assert ran["steps"] > 0


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_lifecycle_state_machine(backend: Backend) -> None:
    """Random interleavings keep every lifecycle invariant (a modest run)."""
    _run(backend, examples=50, steps=40)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the long run takes about 11 minutes per backend
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_lifecycle_state_machine_long(backend: Backend) -> None:
    """The same machine, many more and longer interleavings."""
    _run(backend, examples=1000, steps=100)
