"""JobManager: submit, read, cancel and retry jobs; owns the backends and workers."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import warnings
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import pluggy

from backgrounder._events import EventBus
from backgrounder._json import check_params
from backgrounder._logging import job_log_extra
from backgrounder.clock import Clock, SystemClock
from backgrounder.errors import (
    BackendError,
    ConfigurationError,
    IdempotencyConflictError,
    JobNotFoundError,
    JobStateError,
    SubmitError,
    UnknownTaskError,
)
from backgrounder.models import (
    Assets,
    ErrorCode,
    ErrorInfo,
    Job,
    JobEvent,
    JobPage,
    JobStatus,
    Progress,
    ResourceRequest,
)
from backgrounder.plugins import call_hook, create_plugin_manager, notify
from backgrounder.queue.base import JobQueue
from backgrounder.resources import ResourceLimits, ResourceManager
from backgrounder.settings import ManagerSettings
from backgrounder.store.base import APPEND_ERROR, JobStore
from backgrounder.tasks import DEFAULT, TaskRegistry

__all__ = ["JobManager"]

logger = logging.getLogger(__name__)


#: At most this many submitted jobs are remembered for the local worker.
_FRESH_LIMIT = 4096


def _new_id() -> str:
    """Return a random (version 4) UUID as 32 hex digits, without uuid.UUID's cost."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return raw.hex()


class JobManager:
    """The front of backgrounder: submit jobs, read them, cancel and retry them.

    ``async with JobManager(db_path="jobs.db", registry=registry) as manager:``
    opens the store and queue, puts the store's queued jobs back on the queue,
    recovers jobs whose worker died, and (with ``worker_count`` > 0) runs jobs in
    this process. Every option of ManagerSettings is a keyword argument.
    """

    def __init__(
        self,
        *,
        store: JobStore | str | None = None,
        queue: JobQueue | str | None = None,
        db_path: str | Path | None = None,
        registry: TaskRegistry | None = None,
        resource_limits: ResourceLimits | None = None,
        plugins: Iterable[object] | None = None,
        clock: Clock | None = None,
        worker_id: str | None = None,
        **options: Any,
    ) -> None:
        """Build a manager; nothing is opened until ``start()``.

        Args:
            store: A JobStore or a URL (``sqlite:///jobs.db``, ``redis://...``).
            queue: A JobQueue or a URL (``memory://``, ``redis://...``).
            db_path: Shorthand for a SQLite store at this path.
            registry: The tasks this process knows.
            resource_limits: Limits for this process's workers.
            plugins: Extra plugin objects.
            clock: The clock (tests pass a FakeClock).
            worker_id: The in-process worker's id; default host, pid and a suffix.
            **options: ManagerSettings fields (lease_seconds, worker_count, ...).

        Raises:
            ConfigurationError: An option is invalid, or a URL scheme is unknown.
        """
        try:
            self.settings = ManagerSettings(**options)
        except ValueError as exc:
            raise ConfigurationError(f"invalid JobManager options: {exc}") from exc
        if store is not None and db_path is not None:
            raise ConfigurationError("pass store= or db_path=, not both")
        self.pm: pluggy.PluginManager = create_plugin_manager(plugins)
        self.clock: Clock = clock or SystemClock()
        self.registry = registry if registry is not None else TaskRegistry()
        if db_path is not None:
            store = f"sqlite:///{db_path}"
        self.store: JobStore = self._resolve(
            "store", store or "sqlite:///backgrounder.db"
        )
        self.queue: JobQueue = self._resolve("queue", queue or "memory://")
        probes = [
            p for batch in self.pm.hook.backgrounder_resource_probes() for p in batch
        ]
        self.resources = ResourceManager(resource_limits, probes, clock=self.clock)
        self.events_bus = EventBus()
        self.worker_id = worker_id
        self.worker: Any = None
        self._started = False
        self._closed = False
        self._maintenance: asyncio.Task[None] | None = None
        self._has_event_hooks = bool(
            self.pm.hook.backgrounder_job_event.get_hookimpls()
        )
        #: Jobs submitted here and not yet claimed here, newest last (bounded):
        #: the local worker admits them without reading them back from the store.
        self._fresh: dict[str, Job] = {}

    def _resolve(self, kind: str, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        hook = getattr(self.pm.hook, f"backgrounder_create_{kind}")
        built = hook(url=value)
        if built is None:
            schemes = _known_schemes(self.pm, kind)
            raise ConfigurationError(
                f"no installed plugin handles {kind} URL {_mask(value)!r}; "
                f"installed schemes: {', '.join(schemes) or 'none'}"
            )
        return built

    def __repr__(self) -> str:
        return f"JobManager(store={self.store!r}, queue={self.queue!r})"

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the backends, restore the queue, recover, and start workers.

        Raises:
            BackendError: The store or queue cannot be opened; nothing is left open.
        """
        if self._started:
            return
        try:
            await self.store.open(self.clock)
            await self.queue.open(self.clock)
            await self.resources.open()
            await call_hook(
                self.pm, "backgrounder_register_tasks", registry=self.registry
            )
            await self.restore_queue()
            await self.recover_expired()
        except BaseException:
            await self._close_backends()
            raise
        self._started = True
        self._closed = False
        self._maintenance = asyncio.create_task(
            self._maintenance_loop(), name="backgrounder-maintenance"
        )
        if self.settings.worker_count > 0:
            from backgrounder.worker import Worker

            self.worker = Worker(
                self, concurrency=self.settings.worker_count, worker_id=self.worker_id
            )
            await self.worker.start()
        logger.info(
            "job manager started: store=%s queue=%s workers=%d",
            self.store.name,
            self.queue.name,
            self.settings.worker_count,
            extra={"event": "manager.started"},
        )

    async def close(self, *, drain: bool = True) -> None:
        """Stop workers (draining within shutdown_grace_seconds) and close backends."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        if self.worker is not None:
            await self.worker.stop(drain=drain)
        # Child processes of process-isolated tasks end with the manager (#7).
        from backgrounder.isolation import close_process_runners

        await close_process_runners(self.registry)
        if self._maintenance is not None:
            self._maintenance.cancel()
            await asyncio.gather(self._maintenance, return_exceptions=True)
        await self._close_backends()
        await self.resources.close()
        logger.info("job manager closed", extra={"event": "manager.closed"})

    async def _close_backends(self) -> None:
        for backend in (self.queue, self.store):
            try:
                await backend.close()
            except Exception:
                logger.warning("closing %r failed", backend, exc_info=True)

    async def __aenter__(self) -> JobManager:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __del__(self) -> None:
        if getattr(self, "_started", False) and not getattr(self, "_closed", True):
            warnings.warn(
                f"{self!r} was not closed; call await manager.close() "
                "(or use 'async with') so its store connection is released",
                ResourceWarning,
                stacklevel=2,
            )

    @property
    def started(self) -> bool:
        """True between ``start()`` and ``close()``."""
        return self._started and not self._closed

    # ------------------------------------------------------------ submit

    async def submit(
        self,
        task: str,
        params: dict[str, Any] | None = None,
        *,
        priority: int = 50,
        timeout_seconds: float | Any | None = DEFAULT,
        max_retries: int | None = None,
        idempotency_key: str | None = None,
        resources: ResourceRequest | dict[str, Any] | None = None,
    ) -> Job:
        """Store a job and queue it; return it at once.

        ``timeout_seconds`` left out takes the task's, then the manager's default;
        None means no limit. The same ``idempotency_key`` with the same task and
        params returns the existing job.

        ``priority`` (0-100) is strict: a waiting job of higher priority always
        starts first, and jobs of one priority start in submission order. There
        is no aging, so a low-priority job waits for as long as higher-priority
        jobs keep arriving; give work that must not starve an equal priority.

        Raises:
            UnknownTaskError: No task of that name is registered.
            InvalidParamsError: Params are not a JSON object of JSON values.
            ParamsTooLargeError: Params exceed max_params_bytes.
            ResourceRequestError: The request can never fit this worker's limits.
            IdempotencyConflictError: The key was used for another request.
            SubmitError: Another field is out of range.
            BackendError: The store or queue failed.
        """
        job, _ = await self.submit_or_get(
            task,
            params,
            priority=priority,
            timeout_seconds=timeout_seconds,
            max_retries=max_retries,
            idempotency_key=idempotency_key,
            resources=resources,
        )
        return job

    async def submit_or_get(
        self,
        task: str,
        params: dict[str, Any] | None = None,
        *,
        priority: int = 50,
        timeout_seconds: float | Any | None = DEFAULT,
        max_retries: int | None = None,
        idempotency_key: str | None = None,
        resources: ResourceRequest | dict[str, Any] | None = None,
    ) -> tuple[Job, bool]:
        """Like ``submit``, and say whether the job is new (False: key replay)."""
        self._require_started()
        job = self._build_job(
            task,
            {} if params is None else params,
            priority=priority,
            timeout_seconds=timeout_seconds,
            max_retries=max_retries,
            idempotency_key=idempotency_key,
            resources=resources,
        )
        expires = None
        if idempotency_key is not None:
            expires = job.created_at + timedelta(
                seconds=self.settings.idempotency_ttl_seconds
            )
        stored, created = await self.store.create(job, idempotency_expires_at=expires)
        if not created:
            if stored.task != job.task or stored.params != job.params:
                raise IdempotencyConflictError(idempotency_key or "", stored.id)
            return stored, False
        if self.settings.worker_count > 0:
            fresh = self._fresh
            if len(fresh) >= _FRESH_LIMIT:
                del fresh[next(iter(fresh))]
            fresh[stored.id] = stored
        try:
            await self.queue.push(stored.id, priority=stored.priority)
        except BackendError as exc:
            # The store is the truth: the job is accepted once stored, and the
            # recovery pass puts queued jobs that missed their push on the queue.
            # Refusing now would make a client's retry submit it twice.
            logger.warning(
                "job %s stored but not queued yet (%s); the recovery pass will "
                "queue it within about lease_seconds",
                stored.id,
                exc,
                extra=job_log_extra(stored, event="job.push_deferred"),
            )
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "job %s submitted: task %s, priority %d",
                stored.id,
                stored.task,
                stored.priority,
                extra=job_log_extra(stored, event="job.submitted"),
            )
        await self.emit("status", stored)
        return stored, True

    def take_fresh(self, job_ids: list[str]) -> list[Job | None]:
        """Return (and forget) the jobs of ``job_ids`` submitted here, else None.

        A snapshot from submission: only what never changes (task, resources,
        priority) may be read from it. A worker starting one still does so by
        compare-and-set on status and attempt, and reads the job from the store
        if that fails (the job was canceled, or retried since).
        """
        pop = self._fresh.pop
        return [pop(job_id, None) for job_id in job_ids]

    def _build_job(
        self,
        task: str,
        params: Any,
        *,
        priority: Any,
        timeout_seconds: Any,
        max_retries: Any,
        idempotency_key: Any,
        resources: Any,
    ) -> Job:
        spec = self.registry.get(task) if isinstance(task, str) else None
        if spec is None:
            raise UnknownTaskError(str(task), self.registry.names())
        settings = self.settings
        check_params(
            params,
            max_bytes=settings.max_params_bytes,
            max_depth=settings.max_params_depth,
        )
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise SubmitError(f"priority must be an integer 0-100 (got {priority!r})")
        if not 0 <= priority <= 100:
            raise SubmitError(f"priority must be between 0 and 100 (got {priority!r})")
        if timeout_seconds is DEFAULT:
            timeout_seconds = spec.timeout_seconds
        if timeout_seconds is DEFAULT:
            timeout_seconds = settings.default_timeout_seconds
        if timeout_seconds is not None:
            if isinstance(timeout_seconds, bool) or not isinstance(
                timeout_seconds, int | float
            ):
                raise SubmitError(
                    "timeout_seconds must be a number > 0 or None "
                    f"(got {timeout_seconds!r})"
                )
            if not math.isfinite(timeout_seconds) or not timeout_seconds > 0:
                raise SubmitError(
                    f"timeout_seconds must be > 0 (got {timeout_seconds!r}); "
                    "use None for no limit"
                )
        if max_retries is None:
            max_retries = spec.max_retries
        if max_retries is None:
            max_retries = settings.default_max_retries
        if (
            isinstance(max_retries, bool)
            or not isinstance(max_retries, int)
            or max_retries < 0
        ):
            raise SubmitError(
                f"max_retries must be an integer >= 0 (got {max_retries!r})"
            )
        if idempotency_key is not None and (
            not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= 255
        ):
            shown = repr(idempotency_key)
            if len(shown) > 60:
                shown = f"{shown[:57]}... ({len(shown)} characters as shown)"
            raise SubmitError(
                f"idempotency_key must be a string of 1-255 characters (got {shown})"
            )
        if isinstance(resources, dict):
            try:
                resources = ResourceRequest.model_validate(resources)
            except ValueError as exc:
                raise SubmitError(f"invalid resources: {exc}") from exc
        if resources is None:
            resources = spec.resources
        if resources is not None and resources.is_empty():
            resources = None
        self.resources.check_submittable(resources, only_here=not self.queue.shared)
        now = self.clock.now()
        return Job(
            id=_new_id(),
            task=task,
            params=params,
            priority=priority,
            max_retries=max_retries,
            timeout_seconds=timeout_seconds,
            idempotency_key=idempotency_key,
            resources=resources,
            created_at=now,
            updated_at=now,
        )

    # ------------------------------------------------------------ read

    async def get(self, job_id: str) -> Job:
        """Return the job.

        Raises:
            JobNotFoundError: No job has that id.
        """
        self._require_started()
        # Store writes of progress are coalesced; a job running here has fresher
        # progress in memory, so readers see it at once. It is noted before the
        # read too: the attempt may end while the store answers, and the read
        # (still "running") must not show the older stored progress then.
        before = self.worker.live_attempt(job_id) if self.worker else None
        job = await self.store.get(job_id)
        if job is None:
            raise JobNotFoundError(job_id)
        if job.status == JobStatus.running and self.worker is not None:
            live = self.worker.live_progress(job.id, job.attempt)
            if live is None and before is not None and before[0] == job.attempt:
                live = before[1]
            if live is not None:
                job = job.model_copy(update={"progress": live})
        return job

    async def list(
        self,
        *,
        status: JobStatus | str | None = None,
        task: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobPage:
        """Return jobs newest first; pass ``next_cursor`` back for the next page.

        Raises:
            ValueError: A filter, the limit or the cursor is invalid.
        """
        self._require_started()
        if status is not None:
            try:
                status = JobStatus(status)
            except ValueError:
                raise ValueError(
                    f"status must be one of {', '.join(JobStatus)} (got {status!r})"
                ) from None
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 1 <= limit <= 1000
        ):
            raise ValueError(f"limit must be an integer 1-1000 (got {limit!r})")
        return await self.store.list(
            status=status, task=task, limit=limit, cursor=cursor
        )

    async def assets(self, job_id: str) -> Assets:
        """Return a done job's outputs (empty when it produced none).

        Raises:
            JobNotFoundError: No job has that id.
            JobStateError: The job is not done yet (or failed, or was canceled).
        """
        job = await self.get(job_id)
        if job.status != JobStatus.done:
            raise JobStateError(
                f"job {job_id!r} is {job.status}; assets are served once it is done",
                job_id=job_id,
                status=job.status,
            )
        return job.assets or Assets()

    async def health(self) -> dict[str, Any]:
        """Return the status of the store, the queue and this process's workers.

        ``ok`` is False when a backend does not answer, the workers died, or every
        slot is held by work that timed out but could not be stopped.
        """
        report: dict[str, Any] = {"ok": True}
        for kind, backend in (("store", self.store), ("queue", self.queue)):
            try:
                await backend.ping()
                report[kind] = {"name": backend.name, "ok": True}
            except Exception as exc:
                report["ok"] = False
                report[kind] = {"name": backend.name, "ok": False, "error": str(exc)}
        if self.worker is not None:
            worker = self.worker.status()
            report["worker"] = worker
            report["ok"] = report["ok"] and worker["ok"]
        else:
            report["worker"] = {"ok": True, "count": 0}
        return report

    # ------------------------------------------------------------ control

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one at once, a running one by request.

        A running job gets ``cancel_requested``; its runner sees JobCanceled at the
        next ``check_canceled()`` and is canceled by force after
        cancel_grace_seconds. Canceling a canceled job changes nothing.

        Raises:
            JobNotFoundError: No job has that id.
            JobStateError: The job is already done or failed.
        """
        for _ in range(10):
            job = await self.get(job_id)
            if job.status == JobStatus.canceled:
                return job
            if job.status in (JobStatus.done, JobStatus.failed):
                raise JobStateError(
                    f"job {job_id!r} is already {job.status} and cannot be canceled",
                    job_id=job_id,
                    status=job.status,
                )
            if job.status == JobStatus.queued:
                now = self.clock.now()
                error = ErrorInfo(
                    code=ErrorCode.canceled,
                    message="canceled while queued",
                    stage=job.progress.stage,
                    attempt=job.attempt,
                )
                updated = await self.store.update(
                    job_id,
                    {
                        "status": JobStatus.canceled,
                        "finished_at": now,
                        "error": error,
                        APPEND_ERROR: error,
                    },
                    expect_status={JobStatus.queued},
                    expect_attempt=job.attempt,
                )
                if updated is None:
                    continue
                await self.queue.remove(job_id)
                self.resources.forget(job_id)
                logger.info(
                    "job %s canceled while queued",
                    job_id,
                    extra=job_log_extra(updated, event="job.canceled"),
                )
                await self.emit("status", updated)
                return updated
            updated = await self.store.update(
                job_id,
                {"cancel_requested": True},
                expect_status={JobStatus.running},
                expect_attempt=job.attempt,
            )
            if updated is None:
                continue
            logger.info(
                "job %s: cancel requested while running",
                job_id,
                extra=job_log_extra(updated, event="job.cancel_requested"),
            )
            if self.worker is not None:
                self.worker.cancel_local(job_id)
            await self.queue.publish_cancel(job_id)
            await self.emit("status", updated)
            return updated
        raise JobStateError(
            f"job {job_id!r} changed state too often to cancel; try again",
            job_id=job_id,
            status="unknown",
        )

    async def retry(self, job_id: str) -> Job:
        """Queue a failed or canceled job again as its next attempt.

        The job gets a fresh retry budget, no error, no cancel request; its error
        history is kept.

        Raises:
            JobNotFoundError: No job has that id.
            JobStateError: The job is not failed or canceled.
        """
        for _ in range(10):
            updated = await self._retry_once(job_id)
            if updated is not None:
                return updated
        raise JobStateError(
            f"job {job_id!r} changed state too often to retry; try again",
            job_id=job_id,
            status="unknown",
        )

    async def _retry_once(self, job_id: str) -> Job | None:
        job = await self.get(job_id)
        if job.status not in (JobStatus.failed, JobStatus.canceled):
            raise JobStateError(
                f"job {job_id!r} is {job.status}; only failed or canceled jobs can be "
                "retried",
                job_id=job_id,
                status=job.status,
            )
        updated = await self.store.update(
            job_id,
            {
                "status": JobStatus.queued,
                "attempt": job.attempt + 1,
                "retries": 0,
                "error": None,
                "cancel_requested": False,
                "worker_id": None,
                "lease_expires_at": None,
                "run_after": None,
                "started_at": None,
                "finished_at": None,
                "progress": Progress(),
                "assets": None,
            },
            expect_status={job.status},
            expect_attempt=job.attempt,
        )
        if updated is None:
            return None
        await self.queue.push(job_id, priority=updated.priority)
        logger.info(
            "job %s queued again by hand as attempt %d",
            job_id,
            updated.attempt,
            extra=job_log_extra(updated, event="job.retried"),
        )
        await self.emit("status", updated)
        return updated

    # ------------------------------------------------------------ events

    def has_listeners(self, job_id: str) -> bool:
        """Return True when an event about ``job_id`` would reach anybody."""
        return self._has_event_hooks or self.events_bus.has_subscribers(job_id)

    async def emit(self, kind: str, job: Job) -> None:
        """Publish an event to this process's subscribers and the job-event hook."""
        if not self.has_listeners(job.id):
            return
        event = JobEvent(kind=kind, job=job)
        self.events_bus.publish(event)
        if self._has_event_hooks:
            await notify(self.pm, "backgrounder_job_event", event=event)

    async def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        """Yield the job's state now, then every change, until it is terminal.

        Changes made in this process arrive at once; changes made by other
        processes are seen by re-reading the store every event_poll_seconds.

        Raises:
            JobNotFoundError: No job has that id.
        """
        queue = self.events_bus.subscribe(job_id)
        try:
            job = await self.get(job_id)
            last = _fingerprint(job)
            yield JobEvent(kind="status", job=job)
            while not job.is_terminal:
                event = await self._next_event(queue)
                if event is None:
                    try:
                        fresh = await self.get(job_id)
                    except JobNotFoundError:
                        return
                    except BackendError as exc:
                        # An outage pauses the stream; it goes on once the store
                        # answers again.
                        logger.debug("event stream of job %s: %s", job_id, exc)
                        continue
                    event = JobEvent(kind="status", job=fresh)
                if _progress_older(event.job, job):
                    # A store read can lag the in-memory progress of the same
                    # attempt (writes are coalesced): never show progress going
                    # back, but keep the read's other news (a cancel request).
                    event = JobEvent(
                        kind=event.kind,
                        job=event.job.model_copy(update={"progress": job.progress}),
                    )
                mark = _fingerprint(event.job)
                if mark == last:
                    continue
                kind = "progress" if mark[:3] == last[:3] else "status"
                last, job = mark, event.job
                yield JobEvent(kind=kind, job=job)
        finally:
            self.events_bus.unsubscribe(job_id, queue)

    async def _next_event(self, queue: asyncio.Queue[JobEvent]) -> JobEvent | None:
        """Return the next published event, or None after event_poll_seconds.

        The wait is on the manager's clock, like every other duration.
        """
        if not queue.empty():
            return queue.get_nowait()
        getter = asyncio.ensure_future(queue.get())
        timer = asyncio.ensure_future(
            self.clock.sleep(self.settings.event_poll_seconds)
        )
        try:
            await asyncio.wait({getter, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        return None

    # ------------------------------------------------------------ recovery

    async def restore_queue(self) -> int:
        """Put every job the store holds as queued on the queue; return how many."""
        count = 0
        for job in await self.store.find_queued(limit=10_000_000):
            await self.queue.push(
                job.id, priority=job.priority, delay_seconds=self._remaining(job)
            )
            count += 1
        if count:
            logger.info(
                "%d queued job(s) from the store put back on the queue",
                count,
                extra={"event": "manager.queue_restored", "count": count},
            )
        return count

    async def recover_expired(self) -> int:
        """Recover running jobs whose worker stopped renewing the lease.

        Each counts as an attempt that ended with ``worker_lost``: it is queued
        again while retries are left, else it ends ``failed``. Jobs this process
        runs itself are never taken.
        """
        recovered = 0
        own = self.worker.live_job_ids() if self.worker is not None else set()
        for job in await self.store.find_expired(self.clock.now()):
            if job.id in own:
                continue
            if await self._recover_one(job):
                recovered += 1
        await self.queue.recover_expired()
        return recovered

    async def _recover_one(self, job: Job) -> bool:
        lease = job.lease_expires_at.isoformat() if job.lease_expires_at else "unknown"
        error = ErrorInfo(
            code=ErrorCode.worker_lost,
            message=(
                f"worker {job.worker_id!r} stopped renewing its lease (it ran out at "
                f"{lease}); the process was killed or cut off"
            ),
            type="WorkerLost",
            stage=job.progress.stage,
            retryable=job.retries < job.max_retries,
            attempt=job.attempt,
        )
        updated = await self.finish_attempt(job, error=error, worker_id=job.worker_id)
        if updated is None:
            return False
        logger.warning(
            "job %s: lease of worker %s expired; attempt %d lost, job now %s",
            job.id,
            job.worker_id,
            job.attempt,
            updated.status,
            extra=job_log_extra(job, event="job.worker_lost"),
        )
        return True

    async def finish_attempt(
        self,
        job: Job,
        *,
        error: ErrorInfo,
        worker_id: str | None,
        progress: Progress | None = None,
    ) -> Job | None:
        """End a running attempt with ``error``: queue a retry or fail for good.

        Compare-and-set on the attempt and worker, so it is a no-op for an attempt
        somebody else already ended. An attempt whose job had a cancel accepted
        is never retried: the job ends canceled. Returns the job after, or None.
        """
        now = self.clock.now()
        retry = error.retryable and job.retries < job.max_retries
        if retry and not job.cancel_requested:
            # The caller's copy may predate a cancel request: read it fresh.
            current = await self.store.get(job.id)
            if current is not None and current.attempt == job.attempt:
                job = job.model_copy(
                    update={"cancel_requested": current.cancel_requested}
                )
        if retry and job.cancel_requested:
            return await self._cancel_instead(job, error, worker_id, progress)
        fields: dict[str, Any] = {
            "error": error,
            APPEND_ERROR: error,
            "worker_id": None,
            "lease_expires_at": None,
        }
        if progress is not None:
            fields["progress"] = progress
        if retry:
            delay = self.backoff_seconds(job.retries)
            fields |= {
                "status": JobStatus.queued,
                "attempt": job.attempt + 1,
                "retries": job.retries + 1,
                "run_after": now + timedelta(seconds=delay),
                "started_at": None,
                "cancel_requested": False,
                # The next attempt starts over, as after a manual retry: what
                # the failed one attached is not the job's output.
                "assets": None,
            }
        else:
            delay = None
            fields |= {"status": JobStatus.failed, "finished_at": now}
        updated = await self.store.update(
            job.id,
            fields,
            expect_status={JobStatus.running},
            expect_attempt=job.attempt,
            expect_worker=worker_id,
            # A retry must not swallow a cancel the user was told was accepted.
            expect_cancel_requested=False if delay is not None else None,
        )
        if updated is None:
            if delay is not None:
                return await self._cancel_instead(job, error, worker_id, progress)
            return None
        if delay is not None and updated.run_after is not None:
            # The stored run_after is the truth: measure the delay from now, not
            # from before the write, so time that passed meanwhile is not added.
            remaining = (updated.run_after - self.clock.now()).total_seconds()
            await self.queue.push(
                updated.id, priority=updated.priority, delay_seconds=max(0, remaining)
            )
        await self.emit("status", updated)
        return updated

    async def _cancel_instead(
        self,
        job: Job,
        error: ErrorInfo,
        worker_id: str | None,
        progress: Progress | None,
    ) -> Job | None:
        """End an attempt as canceled when a cancel request beat its retry."""
        canceled = ErrorInfo(
            code=ErrorCode.canceled,
            message=f"canceled by request; the attempt ended with {error.code}: "
            f"{error.message}"[:4000],
            type=error.type,
            stage=error.stage,
            attempt=job.attempt,
        )
        fields: dict[str, Any] = {
            "status": JobStatus.canceled,
            "finished_at": self.clock.now(),
            "error": canceled,
            APPEND_ERROR: canceled,
            "lease_expires_at": None,
        }
        if progress is not None:
            fields["progress"] = progress
        updated = await self.store.update(
            job.id,
            fields,
            expect_status={JobStatus.running},
            expect_attempt=job.attempt,
            expect_worker=worker_id,
            expect_cancel_requested=True,
        )
        if updated is not None:
            logger.info(
                "job %s canceled: its cancel request came before the retry",
                job.id,
                extra=job_log_extra(updated, event="job.canceled"),
            )
            await self.emit("status", updated)
        return updated

    def backoff_seconds(self, retries: int) -> float:
        """Return the delay before retry number ``retries + 1``, with jitter.

        The base doubles each retry up to retry_backoff_max_seconds; the delay is
        drawn between half the base and the base.
        """
        import random

        base = min(
            self.settings.retry_backoff_max_seconds,
            self.settings.retry_backoff_seconds * (2 ** min(retries, 32)),
        )
        return random.uniform(base / 2, base)

    async def _maintenance_loop(self) -> None:
        """Recover expired leases and re-queue stale queued jobs, forever."""
        interval = self.settings.recovery_interval
        while True:
            await self.clock.sleep(interval)
            try:
                await self.recover_expired()
                await self._requeue_stale()
            except BackendError as exc:
                logger.warning(
                    "recovery pass failed: %s; trying again in %.1f s",
                    exc,
                    interval,
                    extra={"event": "manager.recovery_failed"},
                )
            except Exception:
                logger.exception(
                    "recovery pass raised; trying again in %.1f s",
                    interval,
                    extra={"event": "manager.recovery_failed"},
                )

    async def _requeue_stale(self) -> None:
        """Push queued jobs unchanged for a lease period again (pushes are idempotent).

        Covers a crash between a store write and the queue push that should follow.
        """
        before = self.clock.now() - timedelta(seconds=self.settings.lease_seconds)
        for job in await self.store.find_queued(updated_before=before, limit=1000):
            await self.queue.push(
                job.id, priority=job.priority, delay_seconds=self._remaining(job)
            )

    def _remaining(self, job: Job) -> float:
        """Return the seconds until ``job.run_after``, measured now (0 if due).

        Read the clock just before each push, never before the store read that
        found the job: time passes during that read, and a delay measured from
        an older "now" would push the job later than its run_after.
        """
        if job.run_after is None:
            return 0.0
        return max(0.0, (job.run_after - self.clock.now()).total_seconds())

    def _require_started(self) -> None:
        if not self._started or self._closed:
            raise ConfigurationError(
                "the JobManager is not started; use 'async with JobManager(...)' or "
                "await manager.start() (setup_backgrounder does it in the app lifespan)"
            )


def _progress_older(candidate: Job, shown: Job) -> bool:
    """True when ``candidate`` holds older progress of the attempt already shown."""
    if candidate.attempt != shown.attempt:
        return False
    new, old = candidate.progress.updated_at, shown.progress.updated_at
    if old is None:
        return False
    return new is None or new < old


def _fingerprint(job: Job) -> tuple[Any, ...]:
    return (
        job.status,
        job.attempt,
        job.cancel_requested,
        job.progress.percent,
        job.progress.stage,
        job.progress.processed,
        job.progress.message,
        job.progress.updated_at,
    )


def _known_schemes(pm: pluggy.PluginManager, kind: str) -> list[str]:
    probes = ["sqlite://", "memory://", "redis://", "rediss://", "postgresql://"]
    hook = getattr(pm.hook, f"backgrounder_create_{kind}")
    found = []
    for url in probes:
        try:
            if hook(url=url + "probe") is not None:
                found.append(url)
        except Exception:
            found.append(url)
    return found


def _mask(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(parts.password, "***")
    return url
