"""Worker: claims jobs, runs them with leases, timeouts, cancellation and retries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from backgrounder._json import check_json
from backgrounder._logging import job_log_extra
from backgrounder.clock import SystemClock
from backgrounder.errors import (
    BackendError,
    InvalidParamsError,
    JobCanceled,
    NonRetryableError,
)
from backgrounder.models import (
    Assets,
    ErrorCode,
    ErrorInfo,
    Job,
    JobStatus,
    Progress,
)
from backgrounder.resources import Reservation
from backgrounder.store.base import APPEND_ERROR, Update
from backgrounder.tasks import RunContext, TaskSpec

if TYPE_CHECKING:
    from backgrounder.manager import JobManager

__all__ = ["Worker", "default_worker_id"]

logger = logging.getLogger(__name__)


_CLAIM_LEASE_SECONDS = 5.0
_QUEUED = frozenset({JobStatus.queued})
_RUNNING = frozenset({JobStatus.running})


def default_worker_id() -> str:
    """Return an id unique per host and process: ``host:pid:suffix``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class _Outcome:
    """How an attempt ended, as the worker will record it."""

    kind: str  # done | error | canceled | shutdown | lost
    assets: Assets | None = None
    error: ErrorInfo | None = None


def _raise_flag(execution: _Execution, flag: str) -> None:
    setattr(execution, flag, True)
    execution.poke()


@dataclass
class _Execution:
    """One running attempt and the signals that can end it.

    Signals (cancel, stop, timeout, end of the cancel grace) set a flag and
    resolve ``wake``, the one future the attempt's task waits on; the runner's
    task resolves it too when it ends.
    """

    job: Job
    spec: TaskSpec
    ctx: RunContext
    reservation: Reservation | None
    cancel: bool = False
    stop: bool = False
    stop_reason: str = ""
    timed_out: bool = False
    grace_over: bool = False
    wake: asyncio.Future[None] | None = None
    pending_progress: Progress | None = None
    flush_task: asyncio.Task[None] | None = None
    last_flush: float = -1e18
    #: Progress events: the last one sent, when, and the newest one held back.
    evented: Progress | None = None
    last_event: float = -1e18
    event_pending: Progress | None = None
    event_task: asyncio.Task[None] | None = None
    thread_done: asyncio.Event | None = None
    run: asyncio.Future[Any] | None = None
    started_mono: float = 0.0

    def poke(self, _: object = None) -> None:
        """Wake the attempt's task to look at its flags."""
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def request_cancel(self) -> None:
        self.cancel = True
        self.poke()

    def request_stop(self, reason: str) -> None:
        if not self.stop:
            self.stop = True
            self.stop_reason = reason
        self.poke()


@dataclass
class _Batch:
    """One claim batch: how many of its jobs were launched (they hold slots)."""

    started: int = 0


class _JobFailed(Exception):
    """Internal: the runner's result could not be stored."""


class Worker:
    """Runs up to ``concurrency`` jobs at once in this process.

    The claim loop takes every free slot, then claims up to that many ids in one
    call; the claimed jobs are read in one call and made ``running`` with a
    lease in one call (a compare-and-set on ``queued`` each), launched, and only
    then are the queue's claims acked. One heartbeat renews the leases of every
    attempt running here every ``heartbeat`` seconds, in one call, and learns of
    cancel requests and of leases taken over. Every ending is written
    compare-and-set on (running, attempt, worker), so an attempt whose lease was
    taken over changes nothing.
    """

    def __init__(
        self,
        manager: JobManager,
        *,
        concurrency: int,
        worker_id: str | None = None,
    ) -> None:
        """Build a worker for ``manager``'s store, queue, registry and clock."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 (got {concurrency!r})")
        limit = manager.resources.limits.max_concurrent_jobs
        self.concurrency = min(concurrency, limit) if limit else concurrency
        self.manager = manager
        self.settings = manager.settings
        self.clock = manager.clock
        self.worker_id = worker_id or default_worker_id()
        self.running: dict[str, _Execution] = {}
        self.zombies = 0
        self._free = self.concurrency
        #: Ids claimed by a batch still at work: what a stop leaves with nobody.
        self._held: set[str] = set()
        #: Attempts whose running write failed without an answer: it may have
        #: landed, leaving the job running here with nothing running it.
        self._unconfirmed: dict[str, int] = {}
        self._slot_freed = asyncio.Event()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._abandoned = False
        self._loop_task: asyncio.Task[None] | None = None
        self._cancel_listener: asyncio.Task[None] | None = None
        self._waker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_error: BaseException | None = None
        self._restarts = 0

    def __repr__(self) -> str:
        return f"Worker({self.worker_id!r}, concurrency={self.concurrency})"

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the claim loop and the cancel listener."""
        self._loop_task = asyncio.create_task(
            self._supervise(), name=f"backgrounder-worker-{self.worker_id}"
        )
        self._waker = asyncio.create_task(
            self._wake_waiting(), name=f"backgrounder-waker-{self.worker_id}"
        )
        self._heartbeat_task = asyncio.create_task(
            self._heartbeat_loop(), name=f"backgrounder-heartbeat-{self.worker_id}"
        )
        cancellations = self.manager.queue.cancellations()
        if cancellations is not None:
            self._cancel_listener = asyncio.create_task(
                self._listen_cancels(cancellations), name="backgrounder-cancels"
            )
        logger.info(
            "worker %s started with %d slot(s)",
            self.worker_id,
            self.concurrency,
            extra={"event": "worker.started", "worker_id": self.worker_id},
        )

    async def stop(self, *, drain: bool = True) -> None:
        """Stop claiming; let running jobs finish within shutdown_grace_seconds.

        Jobs still running after the grace are stopped and put back on the queue
        with no attempt charged. ``drain=False`` skips the grace.
        """
        if self._abandoned:
            return
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            await self._return_held()
            await self._return_unlaunched()
        for helper in (self._cancel_listener, self._waker):
            if helper is not None:
                helper.cancel()
                await asyncio.gather(helper, return_exceptions=True)
        if self.running and drain and self.settings.shutdown_grace_seconds > 0:
            logger.info(
                "worker %s draining %d running job(s) for up to %.1f s",
                self.worker_id,
                len(self.running),
                self.settings.shutdown_grace_seconds,
                extra={"event": "worker.draining", "worker_id": self.worker_id},
            )
            await self._wait_idle(self.settings.shutdown_grace_seconds)
        for execution in list(self.running.values()):
            execution.request_stop("shutdown")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
        logger.info(
            "worker %s stopped",
            self.worker_id,
            extra={"event": "worker.stopped", "worker_id": self.worker_id},
        )

    async def _return_held(self) -> None:
        """Queue again at once what the stopped claim loop claimed but never took.

        A claim interrupted before its jobs were made running leaves their ids
        in flight on the queue: they would come back only when their claim lease
        runs out, seconds later (on a shared queue other workers wait for them).
        Jobs made running but not launched are ``_return_unlaunched``'s.
        """
        held = [job_id for job_id in self._held if job_id not in self.running]
        self._held.clear()
        if not held:
            return
        try:
            jobs = await self.manager.store.get_many(held)
            for job_id, job in zip(held, jobs, strict=True):
                if job is None or job.status != JobStatus.queued:
                    await self.manager.queue.ack(job_id)
                    continue
                await self._put_back(
                    job, "claimed as the worker stopped, before it started"
                )
        except BackendError as exc:
            logger.warning(
                "worker %s could not return %d claimed id(s): %s; they return "
                "when their claim lease runs out",
                self.worker_id,
                len(held),
                exc,
                extra={"event": "worker.stop_failed", "worker_id": self.worker_id},
            )

    async def _return_unlaunched(self) -> None:
        """Queue again, uncharged, jobs this worker made running but never launched.

        Stopping the claim loop can interrupt a claim between the store write that
        makes a job running and its launch; without this the job would wait for
        its lease to run out and be charged an attempt as ``worker_lost``.
        """
        horizon = self.clock.now() + timedelta(seconds=2 * self.settings.lease_seconds)
        try:
            candidates = await self.manager.store.find_expired(horizon, limit=1000)
            for job in candidates:
                if job.worker_id != self.worker_id or job.id in self.running:
                    continue
                await self._unstart(
                    job.id, job.attempt, "claimed as the worker stopped"
                )
        except BackendError as exc:
            logger.warning(
                "worker %s could not return unlaunched claims: %s; their leases "
                "will run out and recovery will take them",
                self.worker_id,
                exc,
                extra={"event": "worker.stop_failed", "worker_id": self.worker_id},
            )

    async def _unstart(self, job_id: str, attempt: int, why: str) -> None:
        """Queue again, uncharged, an attempt the store shows running here that
        nothing runs (the compare-and-set finds nothing when that is not so)."""
        restored = await self.manager.store.update(
            job_id,
            {
                "status": JobStatus.queued,
                "worker_id": None,
                "started_at": None,
                "lease_expires_at": None,
            },
            expect_status=_RUNNING,
            expect_attempt=attempt,
            expect_worker=self.worker_id,
        )
        if restored is not None:
            await self._put_back(restored, f"{why}; no attempt charged")

    async def _put_back(self, job: Job, why: str) -> None:
        """Close the job's claim and queue it again at once; log why."""
        queue = self.manager.queue
        await queue.ack(job.id)
        await queue.push(job.id, priority=job.priority)
        logger.info(
            "job %s: %s; queued again",
            job.id,
            why,
            extra=job_log_extra(job, event="job.requeued", worker_id=self.worker_id),
        )

    async def _wait_idle(self, seconds: float) -> None:
        tasks = set(self._tasks)
        if not tasks:
            return
        timer = asyncio.ensure_future(self.clock.sleep(seconds))
        try:
            pending = tasks
            while pending and not timer.done():
                _, pending = await asyncio.wait(
                    pending | {timer}, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(timer)
        finally:
            timer.cancel()

    def abandon(self) -> None:
        """Stop everything at once without writing anything: a crash, for tests.

        Runners are canceled too; the store is left as a killed process leaves it,
        so the jobs' leases run out and recovery takes them.
        """
        self._stopping = True
        self._abandoned = True
        runs = [e.run for e in self.running.values() if e.run is not None]
        tasks = [
            self._loop_task,
            self._cancel_listener,
            self._waker,
            self._heartbeat_task,
            *self._tasks,
        ]
        for task in [*tasks, *runs]:
            if task is not None:
                task.cancel()
        # A task canceled before its first step never runs its finally block, so
        # give the reservations back here (release is idempotent).
        for execution in self.running.values():
            self.manager.resources.release(execution.reservation)
        self.running.clear()

    def live_job_ids(self) -> set[str]:
        """Ids of jobs this worker is running now."""
        return set(self.running)

    def live_progress(self, job_id: str, attempt: int) -> Progress | None:
        """Return the latest progress of an attempt running here, else None."""
        execution = self.running.get(job_id)
        if execution is None or execution.job.attempt != attempt:
            return None
        return execution.ctx.last_progress

    def live_attempt(self, job_id: str) -> tuple[int, Progress] | None:
        """Return (attempt, latest progress) of the job if it runs here, else None."""
        execution = self.running.get(job_id)
        if execution is None:
            return None
        return execution.job.attempt, execution.ctx.last_progress

    def status(self) -> dict[str, Any]:
        """Return the worker's health: alive, slots, running and zombie counts."""
        alive = self._loop_task is not None and not self._loop_task.done()
        stuck = self.zombies >= self.concurrency
        report: dict[str, Any] = {
            "ok": (alive or (self._stopping and not self._abandoned)) and not stuck,
            "id": self.worker_id,
            "alive": alive,
            "stopping": self._stopping,
            "concurrency": self.concurrency,
            "running": len(self.running),
            "zombies": self.zombies,
            "restarts": self._restarts,
        }
        if self._loop_error is not None:
            report["error"] = repr(self._loop_error)
        if stuck:
            report["error"] = (
                f"all {self.concurrency} slot(s) are held by sync runners that timed "
                "out but have not returned; use process isolation for such tasks"
            )
        return report

    # ------------------------------------------------------------ claim loop

    async def _supervise(self) -> None:
        """Run the claim loop; restart it after an unexpected error, with backoff."""
        delay = 0.1
        while not self._stopping:
            try:
                await self._claim_loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._loop_error = exc
                self._restarts += 1
                logger.exception(
                    "worker %s claim loop crashed; restarting in %.1f s",
                    self.worker_id,
                    delay,
                    extra={"event": "worker.loop_crashed", "worker_id": self.worker_id},
                )
                await self.clock.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _claim_loop(self) -> None:
        """Run two claimers, so one slow store round trip does not idle the rest.

        They share the free slots: a claimer takes every free slot before it
        claims, so no more jobs are claimed than there are free slots.
        """
        claimers = min(self.concurrency, 2)
        async with asyncio.TaskGroup() as group:
            for index in range(claimers):
                group.create_task(self._claimer(), name=f"claimer-{index}")

    def _release_slot(self) -> None:
        self._free += 1
        self._slot_freed.set()

    async def _claimer(self) -> None:
        backoff = 0.1
        while not self._stopping:
            while self._free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            taken, self._free = self._free, 0
            batch = _Batch()
            try:
                if self._unconfirmed:
                    await self._settle_unconfirmed()
                await self._claim_batch(taken, batch)
                backoff = 0.1
            except BackendError as exc:
                logger.warning(
                    "worker %s cannot claim: %s; retrying in %.1f s",
                    self.worker_id,
                    exc,
                    backoff,
                    extra={"event": "worker.claim_failed", "worker_id": self.worker_id},
                )
                await self.clock.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                # Jobs launched before a later step of the batch failed hold
                # their slots (they free them when they end): count them too.
                for _ in range(taken - batch.started):
                    self._release_slot()
            self._loop_error = None

    async def _settle_unconfirmed(self) -> None:
        """Queue again the jobs whose running write landed unanswered.

        Such a job is running under this worker in the store while nothing runs
        it; left alone it would wait for its whole lease and be charged an
        attempt as ``worker_lost``. Raises BackendError while the store is down
        (the claim loop backs off and tries again).
        """
        pending = dict(self._unconfirmed)
        for job_id, attempt in pending.items():
            if job_id not in self.running:
                await self._unstart(
                    job_id, attempt, "its start was stored but not confirmed"
                )
        for job_id in pending:
            self._unconfirmed.pop(job_id, None)

    async def _claim_batch(self, limit: int, batch: _Batch) -> None:
        """Claim, admit and start up to ``limit`` jobs, counted in ``batch``.

        Admission comes before a job is marked running: the claimed jobs are
        read, each one's resources are reserved, and only then are they moved
        from queued to running (compare-and-set each, in one store call). A job
        that does not fit is handed back to the queue untouched in the store
        (still ``queued``, no attempt charged), so the worker never holds a
        claimed job while it waits. Started jobs are launched before the claims
        are acked: a claim that is never acked returns to the queue, where the
        next claim finds the job no longer queued and drops it.
        """
        manager = self.manager
        ids = await manager.queue.claim_many(
            worker_id=self.worker_id,
            # The claim's own lease only covers the step from the queue to the
            # store; kept short, an id stranded by an outage in between returns
            # to the queue within seconds instead of a whole job lease.
            lease_seconds=min(self.settings.lease_seconds, _CLAIM_LEASE_SECONDS),
            timeout_seconds=self.settings.poll_seconds,
            limit=limit,
        )
        if not ids:
            return
        self._held.update(ids)
        stopped = False
        try:
            await self._take_claimed(ids, batch)
        except asyncio.CancelledError:
            stopped = True  # stop() gives back what is still held
            raise
        finally:
            if not stopped:
                self._held.difference_update(ids)

    async def _take_claimed(self, ids: list[str], batch: _Batch) -> None:
        """Read, admit and start the claimed ``ids``, then ack them."""
        manager = self.manager
        # Jobs submitted in this process are known already; the rest are read.
        # A snapshot that turns out stale fails its compare-and-set below and
        # is read from the store and tried once more.
        jobs = manager.take_fresh(ids)
        missing = [job_id for job_id, job in zip(ids, jobs, strict=True) if not job]
        if missing:
            found = iter(await manager.store.get_many(missing))
            jobs = [job if job is not None else next(found) for job in jobs]
        stale: list[str] = []
        deferred: list[Job] = []
        unknown: list[Job] = []
        await self._admit(
            ids,
            jobs,
            deferred,
            stale,
            unknown,
            batch,
            from_cache=len(missing) < len(ids),
        )
        # Ack what was launched or dropped before anything else is awaited: a
        # launched job that ends at once may queue its retry, and a queue
        # ignores a push of an id whose claim is still open.
        held = {*stale, *(job.id for job in deferred)}
        await manager.queue.ack_many([job_id for job_id in ids if job_id not in held])
        if stale:
            jobs = await manager.store.get_many(stale)
            first = len(deferred)
            await self._admit(
                stale, jobs, deferred, [], unknown, batch, from_cache=False
            )
            waiting = {job.id for job in deferred[first:]}
            await manager.queue.ack_many(
                [job_id for job_id in stale if job_id not in waiting]
            )
        for job in unknown:
            await self._fail_unknown_task(job)
        for job in deferred:
            await self._defer(job)

    async def _admit(
        self,
        ids: list[str],
        jobs: list[Job | None],
        deferred: list[Job],
        stale: list[str],
        unknown: list[Job],
        batch: _Batch,
        *,
        from_cache: bool,
    ) -> None:
        """Reserve, mark running and launch the claimed ``jobs``, counted in ``batch``.

        Jobs that do not fit go to ``deferred``. With ``from_cache``, a job whose
        start fails its compare-and-set goes to ``stale`` to be read again. Jobs
        of tasks this worker does not know, made running, go to ``unknown`` for
        the caller to fail once their claims are acked.
        """
        manager = self.manager
        admitted: list[tuple[Job, TaskSpec | None, Reservation | None]] = []
        for job_id, job in zip(ids, jobs, strict=True):
            if job is None or job.status != JobStatus.queued:
                manager.resources.forget(job_id)
                logger.debug("job %s claimed but no longer queued; dropped", job_id)
                continue
            spec = manager.registry.get(job.task)
            if spec is None:
                admitted.append((job, None, None))
                continue
            reservation = manager.resources.try_reserve(
                job.id, job.resources, priority=job.priority
            )
            if reservation is None:
                deferred.append(job)
                continue
            admitted.append((job, spec, reservation))
        try:
            if admitted:
                starting = [job for job, _, _ in admitted]
                try:
                    results = await self._mark_running(starting)
                except BackendError:
                    self._unconfirmed.update({j.id: j.attempt for j in starting})
                    raise
                for (job, spec, reservation), running in zip(
                    admitted, results, strict=True
                ):
                    if running is None:
                        manager.resources.release(reservation)
                        if from_cache:
                            stale.append(job.id)
                        else:
                            logger.debug(
                                "job %s changed before it started; dropped", job.id
                            )
                    elif spec is None or reservation is None:
                        unknown.append(running)
                    else:
                        self._launch(running, spec, reservation)
                        batch.started += 1
                admitted = []
        finally:
            # Reservations of jobs that never reached the store are given back.
            for _, _, reservation in admitted:
                manager.resources.release(reservation)

    async def _mark_running(self, jobs: list[Job]) -> list[Job | None]:
        """Move queued jobs to running with this worker's lease, in one call."""
        now = self.clock.now()
        fields = {
            "status": JobStatus.running,
            "worker_id": self.worker_id,
            "started_at": now,
            "finished_at": None,
            "run_after": None,
            "lease_expires_at": now + timedelta(seconds=self.settings.lease_seconds),
        }
        return await self.manager.store.update_many(
            [
                Update(
                    job.id,
                    fields,
                    expect_status=_QUEUED,
                    expect_attempt=job.attempt,
                )
                for job in jobs
            ]
        )

    async def _defer(self, job: Job) -> None:
        """Hand a job that does not fit now back to the queue, uncharged.

        The store is not touched: the job stays ``queued``. It is claimable again
        after a delay that doubles with each refusal (another worker may take it
        meanwhile), or at once when a release here makes room for it
        (``_wake_waiting``). The claim loop goes on with the next job, so smaller
        jobs behind this one are not blocked.
        """
        resources = self.manager.resources
        delay = resources.recheck_delay(job.id)
        await self.manager.queue.ack(job.id)
        await self.manager.queue.push(
            job.id, priority=job.priority, delay_seconds=delay
        )
        self._held.discard(job.id)  # back on the queue with its delay: not ours
        info = resources.wait_info(job.id)
        reason = info.reason if info is not None else "does not fit"
        level = logging.WARNING if info is None or info.refusals == 1 else logging.DEBUG
        logger.log(
            level,
            "job %s waits for resources (%s); looked at again within %.1f s",
            job.id,
            reason,
            delay,
            extra=job_log_extra(
                job, event="job.resource_wait", worker_id=self.worker_id
            ),
        )

    async def _wake_waiting(self) -> None:
        """Make waiting jobs claimable at once when resources free up.

        Waits for a release here (or poll_seconds on the manager's clock, for
        changes only the probes see), then pushes the waiting jobs that fit now
        with no delay. It never claims or reserves: the claim loop admits them.
        """
        resources = self.manager.resources
        while not self._stopping:
            await resources.wait_changed(self.settings.poll_seconds)
            try:
                for job_id, priority in resources.wakeable():
                    await self.manager.queue.push(job_id, priority=priority)
            except BackendError as exc:
                logger.warning(
                    "worker %s cannot wake waiting jobs: %s; they come back on "
                    "their own delay",
                    self.worker_id,
                    exc,
                    extra={"event": "worker.wake_failed", "worker_id": self.worker_id},
                )
            except Exception:
                logger.exception(
                    "worker %s: waking waiting jobs raised; they come back on their "
                    "own delay",
                    self.worker_id,
                    extra={"event": "worker.wake_failed", "worker_id": self.worker_id},
                )

    async def _fail_unknown_task(self, job: Job) -> None:
        error = ErrorInfo(
            code=ErrorCode.execution_error,
            message=(
                f"task {job.task!r} is not registered in worker {self.worker_id}; "
                "register it in every worker's TaskRegistry"
            ),
            type="UnknownTaskError",
            stage=job.progress.stage,
            attempt=job.attempt,
        )
        await self.manager.finish_attempt(job, error=error, worker_id=self.worker_id)
        logger.error(
            "job %s failed: task %s unknown to this worker",
            job.id,
            job.task,
            extra=job_log_extra(job, event="job.failed", worker_id=self.worker_id),
        )

    def _launch(self, job: Job, spec: TaskSpec, reservation: Reservation) -> None:
        execution = _Execution(
            job=job,
            spec=spec,
            ctx=None,  # type: ignore[arg-type]
            reservation=reservation,
        )
        execution.ctx = RunContext(
            job,
            clock=self.clock,
            gpus=reservation.gpus,
            progress_sink=lambda p: self._on_progress(execution, p),
            assets_sink=lambda a: self._on_assets(execution, a),
        )
        execution.started_mono = self.clock.monotonic()
        # The first progress write waits one interval too: a short job's progress
        # then reaches the store only with its final status, in the same write.
        execution.last_flush = execution.started_mono
        self.running[job.id] = execution
        task = asyncio.create_task(self._execute(execution), name=f"job-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ cancels

    def cancel_local(self, job_id: str) -> bool:
        """Deliver a cancel request to a job running here; return True if it is."""
        execution = self.running.get(job_id)
        if execution is None:
            return False
        execution.request_cancel()
        return True

    async def _listen_cancels(self, cancellations: Any) -> None:
        try:
            async for job_id in cancellations:
                self.cancel_local(job_id)
        finally:
            closer = getattr(cancellations, "aclose", None)
            if closer is not None:
                await closer()

    # ------------------------------------------------------------ execution

    async def _execute(self, execution: _Execution) -> None:
        job = execution.job
        hold_slot_for_thread = False
        released = False
        try:
            if logger.isEnabledFor(logging.INFO):
                logger.info(
                    "job %s started: task %s, attempt %d",
                    job.id,
                    job.task,
                    job.attempt,
                    extra=job_log_extra(
                        job, event="job.started", worker_id=self.worker_id
                    ),
                )
            await self.manager.emit("status", job)
            outcome = await self._run_attempt(execution)
            # Listeners see the last progress before the attempt's ending.
            self._flush_progress_event(execution)
            if outcome.kind == "done" and not self._thread_running(execution):
                # Nothing of the job runs any more and it cannot come back to
                # the queue: its slot and resources take the next job while the
                # result is written (its lease is renewed until then). A failed
                # attempt keeps its slot until its retry is queued, so the retry
                # of a high-priority job goes before older low-priority ones.
                released = True
                self.manager.resources.release(execution.reservation)
                self._release_slot()
            await self._record(execution, outcome)
            hold_slot_for_thread = not released and self._thread_running(execution)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception(
                "job %s: the worker failed to record its outcome; the lease will "
                "expire and recovery will take it",
                job.id,
                extra=job_log_extra(
                    job, event="job.record_failed", worker_id=self.worker_id
                ),
            )
        finally:
            self._cancel_progress_event(execution)
            if execution.flush_task is not None:
                execution.flush_task.cancel()
            # The id may belong to the job's next attempt already (a retry
            # started in another slot while this one was recording): keep it.
            if self.running.get(job.id) is execution:
                del self.running[job.id]
            if hold_slot_for_thread:
                self._hold_until_thread_ends(execution)
            elif not released:
                self.manager.resources.release(execution.reservation)
                self._release_slot()

    def _hold_until_thread_ends(self, execution: _Execution) -> None:
        """Keep the slot and reservation of a sync runner until its thread returns."""
        self.zombies += 1
        assert execution.thread_done is not None
        logger.warning(
            "job %s: its sync runner is still running after the attempt ended; it "
            "keeps its slot and resources until it returns",
            execution.job.id,
            extra=job_log_extra(
                execution.job, event="job.zombie", worker_id=self.worker_id
            ),
        )

        async def wait() -> None:
            assert execution.thread_done is not None
            try:
                await execution.thread_done.wait()
            finally:
                self.zombies -= 1
                self.manager.resources.release(execution.reservation)
                self._release_slot()

        task = asyncio.create_task(wait())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_attempt(self, execution: _Execution) -> _Outcome:
        """Run the runner until it ends, times out, is canceled or must stop.

        The runner, its deadline, the cancel signal and the stop signal (lease lost
        or shutdown) race; whichever comes first decides. A cancel gives the runner
        cancel_grace_seconds to stop on its own before it is canceled by force.
        """
        job = execution.job
        loop = asyncio.get_running_loop()
        execution.wake = loop.create_future()
        timers: list[asyncio.Future[None] | asyncio.TimerHandle] = []
        if job.timeout_seconds is not None:
            # Started before the runner, so the deadline is on the clock by the
            # time the runner's first step runs (a FakeClock takes it then).
            timers.append(self._later(job.timeout_seconds, execution, "timed_out"))
        run = asyncio.ensure_future(self._call_runner(execution))
        execution.run = run
        run.add_done_callback(execution.poke)
        graced = False
        if job.cancel_requested:
            execution.cancel = True
        try:
            while True:
                if not (
                    run.done()
                    or execution.stop
                    or execution.timed_out
                    or execution.grace_over
                    or (execution.cancel and not graced)
                ):
                    await execution.wake
                    execution.wake = loop.create_future()
                if run.done():
                    return self._outcome_of(execution, run)
                if execution.stop:
                    await self._force_stop(execution, run)
                    return _Outcome(kind=execution.stop_reason or "lost")
                if execution.timed_out:
                    await self._force_stop(execution, run)
                    return _Outcome(kind="error", error=self._timeout_error(execution))
                if execution.grace_over:
                    execution.grace_over = False
                    if self._thread_running(execution):
                        # A thread cannot be stopped: the job stays running with
                        # cancel_requested until the runner returns.
                        logger.warning(
                            "job %s: sync runner ignored the cancel for %.1f s; it "
                            "stays running until it returns",
                            job.id,
                            self.settings.cancel_grace_seconds,
                            extra=job_log_extra(job, event="job.cancel_ignored"),
                        )
                        continue
                    await self._force_stop(execution, run)
                    return _Outcome(
                        kind="canceled", error=self._cancel_error(execution)
                    )
                if execution.cancel and not graced:
                    graced = True
                    execution.ctx.request_cancel()
                    timers.append(
                        self._later(
                            self.settings.cancel_grace_seconds, execution, "grace_over"
                        )
                    )
                    logger.info(
                        "job %s: cancel delivered; %.1f s grace",
                        job.id,
                        self.settings.cancel_grace_seconds,
                        extra=job_log_extra(job, event="job.cancel_delivered"),
                    )
        finally:
            execution.wake = None
            for timer in timers:
                timer.cancel()

    def _later(
        self, seconds: float, execution: _Execution, flag: str
    ) -> asyncio.Future[None] | asyncio.TimerHandle:
        """Set ``flag`` on the execution after ``seconds``; cancel() to call off.

        On the system clock this is a loop timer (no task per job); any other
        clock (a FakeClock in tests) is slept on, so it decides when time passes.
        """
        if type(self.clock) is SystemClock:
            loop = asyncio.get_running_loop()
            return loop.call_later(seconds, _raise_flag, execution, flag)
        return asyncio.ensure_future(self._after(seconds, execution, flag))

    async def _after(self, seconds: float, execution: _Execution, flag: str) -> None:
        """Set ``flag`` on the execution after ``seconds`` on the clock."""
        await self.clock.sleep(seconds)
        _raise_flag(execution, flag)

    @staticmethod
    def _thread_running(execution: _Execution) -> bool:
        """True while a sync runner's thread has not returned."""
        done = execution.thread_done
        return done is not None and not done.is_set()

    async def _force_stop(
        self, execution: _Execution, run: asyncio.Future[Any]
    ) -> None:
        """Cancel the runner's task and wait for it (a thread cannot be stopped)."""
        execution.ctx.request_cancel()
        run.cancel()
        if execution.thread_done is None:
            await asyncio.gather(run, return_exceptions=True)

    async def _call_runner(self, execution: _Execution) -> Any:
        runner = execution.spec.runner
        if execution.spec.is_async:
            return await runner.execute(execution.job, execution.ctx)
        return await self._call_in_thread(execution, runner.execute)

    async def _call_in_thread(
        self, execution: _Execution, func: Callable[..., Any]
    ) -> Any:
        """Run a sync runner in a daemon thread; ``thread_done`` marks its end."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Any] = loop.create_future()
        done = asyncio.Event()
        execution.thread_done = done

        def deliver(value: Any, exc: BaseException | None) -> None:
            done.set()
            if result.done():
                return
            if exc is not None:
                result.set_exception(exc)
            else:
                result.set_result(value)

        def body() -> None:
            try:
                value = func(execution.job, execution.ctx)
            except BaseException as exc:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(deliver, None, exc)
                return
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, value, None)

        thread = threading.Thread(
            target=body, name=f"backgrounder-job-{execution.job.id}", daemon=True
        )
        thread.start()
        return await result

    def _outcome_of(self, execution: _Execution, run: asyncio.Future[Any]) -> _Outcome:
        if run.cancelled() or execution.ctx.canceled:
            # Once a cancel was delivered the attempt ends canceled, whatever the
            # runner returned or raised: no result is stored, no retry is made.
            # (Read the exception, so asyncio does not log it as never retrieved.)
            if not run.cancelled():
                run.exception()
            return _Outcome(kind="canceled", error=self._cancel_error(execution))
        exc = run.exception()
        if exc is None:
            try:
                assets = _to_assets(run.result(), execution.ctx)
                return _Outcome(kind="done", assets=assets)
            except InvalidParamsError as bad:
                return _Outcome(
                    kind="error",
                    error=self._error(
                        execution,
                        ErrorCode.execution_error,
                        f"the runner returned output that cannot be stored: {bad}",
                        type_name="InvalidOutputError",
                        retryable=False,
                    ),
                )
        if isinstance(exc, JobCanceled) or (
            isinstance(exc, asyncio.CancelledError) and execution.ctx.canceled
        ):
            return _Outcome(kind="canceled", error=self._cancel_error(execution))
        retryable = not isinstance(exc, NonRetryableError) and not isinstance(
            exc, execution.spec.non_retryable
        )
        # An exception may name its own code (a child process that died says
        # worker_lost); anything else is an execution error.
        code = getattr(exc, "error_code", ErrorCode.execution_error)
        if not isinstance(code, ErrorCode):
            code = ErrorCode.execution_error
        return _Outcome(
            kind="error",
            error=self._error(
                execution,
                code,
                _describe(exc),
                type_name=type(exc).__name__,
                retryable=retryable,
                tb="".join(traceback.format_exception(exc)),
            ),
        )

    def _error(
        self,
        execution: _Execution,
        code: ErrorCode,
        message: str,
        *,
        type_name: str | None = None,
        retryable: bool = True,
        tb: str | None = None,
    ) -> ErrorInfo:
        return ErrorInfo(
            code=code,
            message=message[:4000],
            type=type_name,
            stage=execution.ctx.last_progress.stage,
            retryable=retryable,
            attempt=execution.job.attempt,
            traceback=tb[-20000:] if tb else None,
        )

    def _timeout_error(self, execution: _Execution) -> ErrorInfo:
        return self._error(
            execution,
            ErrorCode.timeout,
            "the attempt ran longer than "
            f"timeout_seconds={execution.job.timeout_seconds}",
            type_name="JobTimeoutError",
        )

    def _cancel_error(self, execution: _Execution) -> ErrorInfo:
        return self._error(
            execution, ErrorCode.canceled, "canceled by request", retryable=False
        )

    # ------------------------------------------------------------ heartbeat

    async def _heartbeat_loop(self) -> None:
        """Every ``heartbeat`` seconds, renew the leases of every attempt here.

        One store call renews them all (a compare-and-set on running, attempt
        and worker each). A renewal that misses means the lease was taken over:
        that attempt stops. A renewed job with a cancel request is canceled.
        """
        interval = self.settings.heartbeat
        while True:
            await self.clock.sleep(interval)
            executions = list(self.running.values())
            if not executions:
                continue
            expires = self.clock.now() + timedelta(seconds=self.settings.lease_seconds)
            fields = {"lease_expires_at": expires}
            try:
                results = await self.manager.store.update_many(
                    [
                        Update(
                            e.job.id,
                            fields,
                            expect_status=_RUNNING,
                            expect_attempt=e.job.attempt,
                            expect_worker=self.worker_id,
                        )
                        for e in executions
                    ]
                )
            except BackendError as exc:
                logger.warning(
                    "worker %s: lease renewal of %d job(s) failed: %s; trying again",
                    self.worker_id,
                    len(executions),
                    exc,
                    extra={
                        "event": "job.heartbeat_failed",
                        "worker_id": self.worker_id,
                        "job_ids": [e.job.id for e in executions],
                    },
                )
                continue
            for execution, fresh in zip(executions, results, strict=True):
                if self.running.get(execution.job.id) is not execution:
                    continue  # it ended while the renewal was on its way
                self._renewed(execution, fresh)

    def _renewed(self, execution: _Execution, fresh: Job | None) -> None:
        job = execution.job
        if fresh is None:
            if execution.run is not None and execution.run.done():
                return  # its ending is being written; the write will tell
            logger.warning(
                "job %s: lease lost to another worker; stopping attempt %d",
                job.id,
                job.attempt,
                extra=job_log_extra(
                    job, event="job.lease_lost", worker_id=self.worker_id
                ),
            )
            execution.request_stop("lost")
            return
        logger.debug("job %s: lease renewed", job.id)
        if fresh.cancel_requested:
            execution.request_cancel()

    # ------------------------------------------------------------ progress

    def _on_progress(self, execution: _Execution, progress: Progress) -> None:
        execution.pending_progress = progress
        if self.manager.events_bus.has_subscribers(execution.job.id) or (
            self.manager._has_event_hooks
        ):
            self._progress_event(execution, progress)
        if execution.flush_task is None:
            execution.flush_task = asyncio.ensure_future(
                self._flush_progress(execution)
            )

    def _progress_event(self, execution: _Execution, progress: Progress) -> None:
        """Send a progress event now, or hold it back to coalesce a burst.

        A new stage is sent at once, and so is the first report of an interval
        (``progress_interval_seconds``); reports within the interval are held
        back and only the newest is sent at its end. A runner reporting in a
        tight loop would otherwise send a whole job to every listener per call,
        and slow itself down by the time they take.
        """
        interval = self.settings.progress_interval_seconds
        wait = execution.last_event + interval - self.clock.monotonic()
        evented = execution.evented
        if wait <= 0 or evented is None or evented.stage != progress.stage:
            self._cancel_progress_event(execution)
            self._send_progress_event(execution, progress)
            return
        execution.event_pending = progress
        if execution.event_task is None:
            execution.event_task = asyncio.ensure_future(
                self._held_progress_event(execution, wait)
            )

    async def _held_progress_event(self, execution: _Execution, wait: float) -> None:
        await self.clock.sleep(wait)
        execution.event_task = None
        self._flush_progress_event(execution)

    def _flush_progress_event(self, execution: _Execution) -> None:
        """Send the progress event held back, if any (the attempt ended, say)."""
        self._cancel_progress_event(execution)
        progress, execution.event_pending = execution.event_pending, None
        if progress is not None:
            self._send_progress_event(execution, progress)

    @staticmethod
    def _cancel_progress_event(execution: _Execution) -> None:
        if execution.event_task is not None:
            execution.event_task.cancel()
            execution.event_task = None

    def _send_progress_event(self, execution: _Execution, progress: Progress) -> None:
        execution.event_pending = None
        execution.evented = progress
        execution.last_event = self.clock.monotonic()
        snapshot = execution.job.model_copy(update={"progress": progress})
        task = asyncio.ensure_future(self.manager.emit("progress", snapshot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_progress(self, execution: _Execution) -> None:
        """Write the latest progress at most once per progress_interval_seconds."""
        job = execution.job
        try:
            while execution.pending_progress is not None:
                wait = (
                    execution.last_flush
                    + self.settings.progress_interval_seconds
                    - self.clock.monotonic()
                )
                if wait > 0:
                    await self.clock.sleep(wait)
                progress, execution.pending_progress = execution.pending_progress, None
                if progress is None:
                    break
                execution.last_flush = self.clock.monotonic()
                try:
                    await self.manager.store.update(
                        job.id,
                        {"progress": progress},
                        expect_status={JobStatus.running},
                        expect_attempt=job.attempt,
                        expect_worker=self.worker_id,
                    )
                except BackendError as exc:
                    logger.warning(
                        "job %s: progress write failed: %s; the next one will carry it",
                        job.id,
                        exc,
                        extra=job_log_extra(job, event="job.progress_failed"),
                    )
        finally:
            execution.flush_task = None

    async def _on_assets(self, execution: _Execution, assets: Assets) -> None:
        check_json(assets.model_dump(), path="assets", max_depth=64)
        job = execution.job
        await self.manager.store.update(
            job.id,
            {"assets": assets},
            expect_status={JobStatus.running},
            expect_attempt=job.attempt,
            expect_worker=self.worker_id,
        )

    # ------------------------------------------------------------ record

    async def _record(self, execution: _Execution, outcome: _Outcome) -> None:
        """Write the attempt's ending, retrying store errors for a lease period."""
        job = execution.job
        progress = execution.ctx.last_progress
        execution.pending_progress = None
        delay = 0.1
        deadline = self.clock.monotonic() + self.settings.lease_seconds
        while True:
            try:
                await self._write_outcome(execution, outcome, progress)
                return
            except BackendError as exc:
                if self.clock.monotonic() + delay > deadline:
                    raise
                logger.warning(
                    "job %s: recording %s failed: %s; retrying in %.1f s",
                    job.id,
                    outcome.kind,
                    exc,
                    delay,
                    extra=job_log_extra(job, event="job.record_retry"),
                )
                await self.clock.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _write_outcome(
        self, execution: _Execution, outcome: _Outcome, progress: Progress
    ) -> None:
        job = execution.job
        manager = self.manager
        elapsed = self.clock.monotonic() - execution.started_mono
        cas = {
            "expect_status": {JobStatus.running},
            "expect_attempt": job.attempt,
            "expect_worker": self.worker_id,
        }
        if outcome.kind == "lost":
            return
        if outcome.kind == "shutdown":
            updated = await manager.store.update(
                job.id,
                {
                    "status": JobStatus.queued,
                    "worker_id": None,
                    "lease_expires_at": None,
                    "started_at": None,
                    "progress": progress,
                },
                **cas,  # type: ignore[arg-type]
            )
            if updated is not None:
                await manager.queue.push(job.id, priority=job.priority)
                logger.info(
                    "job %s: stopped by shutdown after %.2f s; queued again, "
                    "no attempt charged",
                    job.id,
                    elapsed,
                    extra=job_log_extra(
                        job,
                        event="job.requeued",
                        worker_id=self.worker_id,
                        duration=elapsed,
                    ),
                )
                await manager.emit("status", updated)
            return
        if outcome.kind == "done":
            done = Update(
                job.id,
                {
                    "status": JobStatus.done,
                    "finished_at": self.clock.now(),
                    "assets": outcome.assets,
                    "progress": progress,
                    "error": None,
                    "lease_expires_at": None,
                },
                expect_status=_RUNNING,
                expect_attempt=job.attempt,
                expect_worker=self.worker_id,
                expect_cancel_requested=False,
            )
            # The job is read back only for whoever listens to its events.
            listened = manager.has_listeners(job.id)
            if listened:
                updated = await manager.store.update(
                    job.id, done.fields, **done.expectations()
                )
            else:
                updated = job if await manager.store.apply(done) else None
            if updated is None:
                # A cancel accepted while the result was on its way wins: the
                # user was told the job is being canceled, so it never ends done.
                outcome = _Outcome(kind="canceled", error=self._cancel_error(execution))
            if updated is not None:
                if logger.isEnabledFor(logging.INFO):
                    logger.info(
                        "job %s done in %.3f s",
                        job.id,
                        elapsed,
                        extra=job_log_extra(
                            job,
                            event="job.done",
                            worker_id=self.worker_id,
                            duration=elapsed,
                        ),
                    )
                if not listened and manager.has_listeners(job.id):
                    # Somebody subscribed while the write was on its way.
                    updated = await manager.store.get(job.id) or updated
                    listened = True
                if listened:
                    await manager.emit("status", updated)
                return
        assert outcome.error is not None
        if outcome.kind == "canceled":
            updated = await manager.store.update(
                job.id,
                {
                    "status": JobStatus.canceled,
                    "finished_at": self.clock.now(),
                    "progress": progress,
                    "error": outcome.error,
                    APPEND_ERROR: outcome.error,
                    "lease_expires_at": None,
                },
                **cas,  # type: ignore[arg-type]
            )
            if updated is not None:
                logger.info(
                    "job %s canceled after %.3f s",
                    job.id,
                    elapsed,
                    extra=job_log_extra(
                        job,
                        event="job.canceled",
                        worker_id=self.worker_id,
                        duration=elapsed,
                    ),
                )
                await manager.emit("status", updated)
            else:
                self._log_stale(job, "canceled")
            return
        updated = await manager.finish_attempt(
            job, error=outcome.error, worker_id=self.worker_id, progress=progress
        )
        if updated is None:
            self._log_stale(job, "failed")
        elif updated.status == JobStatus.queued:
            logger.warning(
                "job %s: attempt %d failed (%s: %s); retry %d of %d queued",
                job.id,
                job.attempt,
                outcome.error.code,
                outcome.error.message[:200],
                updated.retries,
                updated.max_retries,
                extra=job_log_extra(
                    job,
                    event="job.retry_scheduled",
                    worker_id=self.worker_id,
                    duration=elapsed,
                ),
            )
        else:
            logger.error(
                "job %s failed after %.3f s (%s: %s)",
                job.id,
                elapsed,
                outcome.error.code,
                outcome.error.message[:200],
                extra=job_log_extra(
                    job, event="job.failed", worker_id=self.worker_id, duration=elapsed
                ),
            )

    def _log_stale(self, job: Job, what: str) -> None:
        logger.warning(
            "job %s: attempt %d ended %s, but the job is no longer this worker's; "
            "nothing was written",
            job.id,
            job.attempt,
            what,
            extra=job_log_extra(
                job, event="job.stale_outcome", worker_id=self.worker_id
            ),
        )


def _to_assets(value: Any, ctx: RunContext) -> Assets | None:
    """Turn a runner's return value into Assets, or raise InvalidParamsError.

    A runner that returns None ends with what it attached along the way
    (``ctx.attach_assets``), so the done write never sets them back to None.
    """
    if value is None:
        return ctx.attached_assets
    if isinstance(value, Assets):
        assets = value
    elif isinstance(value, dict):
        check_json(value, path="output", max_depth=64)
        assets = Assets(custom=value)
    else:
        raise InvalidParamsError(
            f"execute returned a {type(value).__name__}; return Assets, a dict of "
            "JSON values, or None",
            path="output",
        )
    check_json(assets.model_dump(), path="output", max_depth=64)
    return assets


def _describe(exc: BaseException) -> str:
    """Return ``str(exc)``, or a fallback when that itself raises."""
    try:
        text = str(exc)
    except Exception:
        text = f"<{type(exc).__name__}: its message could not be read>"
    return text or type(exc).__name__
