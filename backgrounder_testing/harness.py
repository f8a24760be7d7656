"""run_task: run one runner the way a worker would, and record what it did."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import traceback
import uuid
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from backgrounder._json import check_json, check_params
from backgrounder.clock import Clock
from backgrounder.errors import (
    ConfigurationError,
    InvalidParamsError,
    JobCanceled,
    NonRetryableError,
    ResourceRequestError,
)
from backgrounder.models import (
    Assets,
    ErrorCode,
    ErrorInfo,
    Job,
    JobStatus,
    Progress,
    ResourceRequest,
)
from backgrounder.resources import ResourceManager
from backgrounder.settings import ManagerSettings
from backgrounder.tasks import DEFAULT, TaskRegistry, TaskSpec
from backgrounder.worker import _describe, _to_assets
from backgrounder_testing._context import (
    HarnessContext,
    TrackingClock,
    caller,
    origin,
    runner_frames,
)
from backgrounder_testing.clock import FakeClock

__all__ = ["TaskMistakeError", "TaskResult", "run_task", "runner_frames"]

_DEFAULTS = ManagerSettings()
# The last results run_task returned, so the pytest plugin can explain a failed
# ``assert result.status == "done"`` (pytest shows only a diff of two strings).
_recent: list[weakref.ref[TaskResult]] = []

#: How many times run_task moves a FakeClock for a runner before it gives up.
MAX_JUMPS = 100_000


class TaskMistakeError(AssertionError):
    """Raised by ``run_task`` when the runner misuses the API.

    The mistakes (a bad progress call, an output that cannot be stored, a
    ``ctx`` coroutine never awaited) are listed in the message, and the full
    result is on ``result``. Pass ``strict=False`` to get the result instead, as
    the worker would record it.

    Added in 0.1.
    """

    def __init__(self, result: TaskResult) -> None:
        """Build the error from the result whose ``mistakes`` it lists."""
        self.result = result
        lines = "\n".join(f"  - {m}" for m in result.mistakes)
        super().__init__(
            f"task {result.job.task!r} misuses the runner API:\n{lines}\n"
            f"(the attempt ended {result.status}; run_task(..., strict=False) "
            "returns the result as the worker would record it)"
        )


@dataclass(frozen=True, repr=False)
class TaskResult:
    """How one attempt ended, as ``run_task`` saw it.

    Attributes:
        status: ``done``, ``failed`` (``error.code`` says why: ``execution_error``
            or ``timeout``) or ``canceled``. A failure the worker would retry is
            still ``failed`` here; ``error.retryable`` says whether it would.
        assets: The outputs (returned, else attached with ``ctx.attach_assets``),
            or None.
        error: Why the attempt did not end ``done``, or None.
        progress: Every progress event, in the order the runner reported them.
        job: The job the runner was given.
        exception: The exception the runner raised, if any.
        gpus: The GPU indexes the runner was given (``ctx.gpus``).
        elapsed_seconds: The attempt's length on the clock it ran with.
        mistakes: Misuses of the runner API that run_task noticed.

    Added in 0.1.
    """

    status: JobStatus
    assets: Assets | None
    error: ErrorInfo | None
    progress: list[Progress]
    job: Job
    exception: BaseException | None = None
    gpus: list[int] = field(default_factory=list)
    elapsed_seconds: float = 0.0
    mistakes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the attempt ended ``done`` with no mistakes."""
        return self.status == JobStatus.done and not self.mistakes

    @property
    def last_progress(self) -> Progress:
        """The last progress reported (the job's initial one if none was)."""
        return self.progress[-1] if self.progress else self.job.progress

    def raise_for_error(self) -> None:
        """Raise the runner's own exception, or AssertionError, unless done.

        Raises:
            BaseException: The runner's exception when it raised one.
            AssertionError: The attempt timed out or was canceled.
        """
        if self.status == JobStatus.done:
            return
        if self.exception is not None:
            raise self.exception
        raise AssertionError(f"the attempt ended {self.status}: {self._why()}")

    def _why(self) -> str:
        if self.error is None:
            return ""
        where = origin(self.exception) if self.exception is not None else ""
        kind = f"{self.error.type}: " if self.error.type else ""
        text = f"{self.error.code} in stage {self.error.stage}: {kind}"
        return text + self.error.message + (f" ({where})" if where else "")

    def __repr__(self) -> str:
        parts = [f"status={self.status.value!r}"]
        if self.error is not None:
            parts.append(f"error={self._why()!r}")
        if self.mistakes:
            parts.append(f"mistakes={self.mistakes!r}")
        parts.append(f"progress=[{len(self.progress)} events]")
        if self.assets is not None:
            parts.append(f"assets={self.assets.model_dump()!r}"[:300])
        return f"TaskResult({', '.join(parts)})"


async def run_task(
    runner: Any,
    params: dict[str, Any] | None = None,
    *,
    clock: Clock | None = None,
    gpus: Any = None,
    timeout_seconds: float | Any | None = DEFAULT,
    cancel_after_progress: int | None = None,
    attempt: int = 1,
    cancel_grace_seconds: float = _DEFAULTS.cancel_grace_seconds,
    autojump: bool = True,
    strict: bool = True,
    task: str | None = None,
) -> TaskResult:
    """Run one attempt of ``runner`` the way a worker would; return what happened.

    An ``async def execute`` runs on this event loop, a plain ``def execute`` in
    a thread. The runner gets a RunContext with the clock and GPUs, its deadline
    is kept on the clock, and every progress event is recorded.

    With a FakeClock (the default is a fresh one) and ``autojump``, whenever the
    runner sleeps on the clock (``ctx.sleep`` or ``ctx.clock.sleep``) and the
    event loop has nothing else to do, the clock jumps to the next deadline: a
    runner that sleeps an hour finishes at once, and a two-hour sleep under a
    one-hour timeout ends ``timeout``. While the runner waits only for something
    else (a thread, a socket), the clock stays put; a runner that sleeps on the
    clock while it also waits for a thread (``asyncio.gather``) lets the clock
    jump meanwhile.

    Args:
        runner: An object with ``execute(job, ctx)``, as given to
            ``TaskRegistry.add``; its ``timeout_seconds``, ``resources`` and
            ``non_retryable`` attributes count as they would there.
        params: The job's params; must be a JSON object, as at submit.
        clock: The clock; default a new FakeClock.
        gpus: Device indexes to give the runner as ``ctx.gpus``; or a GPU probe
            (``SimulatedGPUs``) from which devices are reserved for the runner's
            ``resources`` request, as a worker would.
        timeout_seconds: The attempt's limit on the clock; left out, the runner's
            ``timeout_seconds``, then the manager default (3600); None for none.
        cancel_after_progress: Request a cancel right after this many progress
            events, as ``POST /cancel`` would; the runner sees ``JobCanceled`` at
            its next ``check_canceled()`` or ``ctx.sleep()``.
        attempt: The attempt number the runner sees (``job.attempt``).
        cancel_grace_seconds: How long, on the clock, a runner may go on after a
            cancel request before it is canceled by force.
        autojump: Move a FakeClock as described above.
        strict: Raise TaskMistakeError when the runner misuses the API; False
            returns the result as the worker would record it.
        task: The task name the job carries; default the runner's class name.

    Returns:
        The result: ``status``, ``assets``, ``error``, ``progress`` and more.

    Raises:
        InvalidParamsError: ``params`` are not a JSON object of JSON values.
        ResourceRequestError: The runner's resources fit none of ``gpus``.
        ConfigurationError: The runner has no ``execute`` or a bad option.
        TaskMistakeError: ``strict`` and the runner misused the API.

    Added in 0.1.
    """
    __tracebackhide__ = True  # a failure shows the test, not this harness
    params = {} if params is None else params
    check_params(
        params,
        max_bytes=_DEFAULTS.max_params_bytes,
        max_depth=_DEFAULTS.max_params_depth,
    )
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt must be an integer >= 1 (got {attempt!r})")
    if cancel_after_progress is not None and cancel_after_progress < 0:
        raise ValueError(
            f"cancel_after_progress must be >= 0 (got {cancel_after_progress!r})"
        )
    if isinstance(runner, type):
        raise ConfigurationError(
            f"run_task got the class {runner.__name__}; pass an instance, not the "
            f"class: run_task({runner.__name__}(), ...)"
        )
    name = task or type(runner).__name__
    spec = TaskRegistry().add(name, runner, timeout_seconds=timeout_seconds)
    clock = clock if clock is not None else FakeClock()
    job = _make_job(spec, params, clock.now(), attempt)
    devices = _reserve_gpus(gpus, spec.resources, job.id)

    run = _Run(spec, job, clock, devices, cancel_after_progress)
    run.grace_seconds = cancel_grace_seconds
    result = await run.execute(autojump=autojump)
    if strict and result.mistakes:
        raise TaskMistakeError(result)
    _recent[:] = [ref for ref in _recent[-7:] if ref() is not None]
    _recent.append(weakref.ref(result))
    return result


def recent_result(status: JobStatus) -> TaskResult | None:
    """Return the newest live result run_task gave with ``status``, or None."""
    for ref in reversed(_recent):
        result = ref()
        if result is not None and result.status == status:
            return result
    return None


def forget_results() -> None:
    """Drop the record of recent results (the plugin calls it before each test)."""
    _recent.clear()


def _make_job(
    spec: TaskSpec, params: dict[str, Any], now: datetime, attempt: int
) -> Job:
    timeout = spec.timeout_seconds
    if timeout is DEFAULT:
        timeout = _DEFAULTS.default_timeout_seconds
    return Job(
        id=uuid.uuid4().hex,
        task=spec.name,
        params=params,
        status=JobStatus.running,
        attempt=attempt,
        retries=attempt - 1,
        max_retries=spec.max_retries if spec.max_retries is not None else 0,
        timeout_seconds=timeout,
        resources=spec.resources,
        worker_id="run_task",
        created_at=now,
        started_at=now,
        updated_at=now,
    )


def _reserve_gpus(gpus: Any, request: ResourceRequest | None, job_id: str) -> list[int]:
    """Return ``ctx.gpus``: given indexes, or devices reserved on a probe."""
    if gpus is None:
        return []
    if not callable(getattr(gpus, "read_gpus", None)):
        indexes = list(gpus)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in indexes):
            raise TypeError(
                "gpus must be device indexes (a list of int) or a GPU probe such as "
                f"SimulatedGPUs (got {gpus!r})"
            )
        return indexes
    resources = ResourceManager(None, [gpus])
    resources.check_submittable(request)
    reservation = resources.try_reserve(job_id, request)
    if reservation is None:
        free = ", ".join(
            f"GPU {g.index}: {g.memory_total_mb - g.memory_used_mb:.0f} MB free"
            for g in resources.read_gpus()
        )
        raise ResourceRequestError(
            f"the runner asks for {request}, which does not fit the simulated GPUs "
            f"now ({free}); a worker would keep the job queued until it does. "
            "Lower their used memory (set_used) or the request."
        )
    return reservation.gpus


class _Run:
    """One attempt under run_task: the runner and what may end it."""

    def __init__(
        self,
        spec: TaskSpec,
        job: Job,
        clock: Clock,
        gpus: list[int],
        cancel_after: int | None,
    ) -> None:
        self.spec = spec
        self.job = job
        self.clock = clock
        self.gpus = gpus
        self.cancel_after = cancel_after
        self.grace_seconds = _DEFAULTS.cancel_grace_seconds
        self.progress: list[Progress] = []
        self.mistakes: list[str] = []
        self.activity = asyncio.Event()
        self.cancel = asyncio.Event()
        self.tracking = TrackingClock(clock, self.activity)
        self.loop = asyncio.get_running_loop()
        self.ctx = HarnessContext(
            self,
            job,
            clock=self.tracking,
            gpus=gpus,
            progress_sink=lambda _p: self.activity.set(),
            assets_sink=self._on_assets,
        )
        self.thread_done: threading.Event | None = None

    def mistake(self, text: str) -> None:
        self.mistakes.append(text)

    def request_cancel(self) -> None:
        """Deliver a cancel request from any thread."""
        if _on_loop(self.loop):
            self.cancel.set()
        else:
            self.loop.call_soon_threadsafe(self.cancel.set)

    async def _on_assets(self, assets: Assets) -> None:
        try:
            check_json(assets.model_dump(), path="assets", max_depth=64)
        except InvalidParamsError as exc:
            self.mistake(f"ctx.attach_assets(...) was refused: {exc} ({caller()})")
            raise

    async def execute(self, *, autojump: bool) -> TaskResult:
        """Race the runner against its deadline and the cancel request."""
        started = self.clock.monotonic()
        run = asyncio.ensure_future(self._call_runner())
        timer = None
        if self.job.timeout_seconds is not None:
            timer = asyncio.ensure_future(self.clock.sleep(self.job.timeout_seconds))
        cancel = asyncio.ensure_future(self.cancel.wait())
        grace: asyncio.Future[None] | None = None
        if self.cancel_after == 0:
            self.ctx._canceled = True
            self.cancel.set()
        jumps = 0
        try:
            while True:
                await _settle()
                if run.done():
                    return self._finish(self._outcome(run), started)
                if timer is not None and timer.done():
                    await self._force_stop(run)
                    return self._finish(self._timeout(), started)
                if grace is not None and grace.done():
                    await self._force_stop(run)
                    return self._finish(self._canceled(), started)
                if cancel.done() and grace is None:
                    self.ctx.request_cancel()
                    grace = asyncio.ensure_future(self.clock.sleep(self.grace_seconds))
                    continue
                if autojump and self._jump():
                    jumps += 1
                    if jumps > MAX_JUMPS:
                        await self._force_stop(run)
                        raise AssertionError(
                            f"task {self.job.task!r} kept sleeping on the clock "
                            f"({MAX_JUMPS} jumps, {self._elapsed(started):.0f} s of "
                            "fake time) without finishing; give run_task a "
                            "timeout_seconds"
                        )
                    continue
                self.activity.clear()
                woken = asyncio.ensure_future(self.activity.wait())
                waiting: set[asyncio.Future[Any]] = {run, cancel, woken}
                waiting |= {f for f in (timer, grace) if f is not None}
                try:
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
        finally:
            for future in (timer, cancel, grace):
                if future is not None:
                    future.cancel()
            if not run.done():
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)

    def _jump(self) -> bool:
        """Move a FakeClock to its next deadline if the runner sleeps on it."""
        if not isinstance(self.clock, FakeClock) or self.tracking.sleeping == 0:
            return False
        return self.clock.advance_to_next() is not None

    async def _call_runner(self) -> Any:
        if self.spec.is_async:
            return await self.spec.runner.execute(self.job, self.ctx)
        return await self._call_in_thread()

    async def _call_in_thread(self) -> Any:
        result: asyncio.Future[Any] = self.loop.create_future()
        done = threading.Event()
        self.thread_done = done

        def deliver(value: Any, exc: BaseException | None) -> None:
            if result.done():
                return
            if exc is not None:
                result.set_exception(exc)
            else:
                result.set_result(value)

        def body() -> None:
            try:
                value = self.spec.runner.execute(self.job, self.ctx)
            except BaseException as exc:
                outcome: tuple[Any, BaseException | None] = (None, exc)
            else:
                outcome = (value, None)
            done.set()
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(deliver, *outcome)

        threading.Thread(
            target=body, name=f"run_task-{self.job.task}", daemon=True
        ).start()
        return await result

    async def _force_stop(self, run: asyncio.Future[Any]) -> None:
        self.ctx.request_cancel()
        run.cancel()
        if self.thread_done is None:
            await asyncio.gather(run, return_exceptions=True)

    # ------------------------------------------------------------ outcomes

    def _outcome(
        self, run: asyncio.Future[Any]
    ) -> tuple[JobStatus, Assets | None, ErrorInfo | None, BaseException | None]:
        if run.cancelled():
            return self._canceled()
        exc = run.exception()
        if exc is None:
            try:
                assets = _to_assets(run.result(), self.ctx)
            except InvalidParamsError as bad:
                self.mistake(f"the runner's return value was refused: {bad}")
                error = self._error(
                    ErrorCode.execution_error,
                    f"the runner returned output that cannot be stored: {bad}",
                    type_name="InvalidOutputError",
                    retryable=False,
                )
                return JobStatus.failed, None, error, bad
            return JobStatus.done, assets, None, None
        if isinstance(exc, JobCanceled) or (
            isinstance(exc, asyncio.CancelledError) and self.ctx.canceled
        ):
            return self._canceled()
        retryable = not isinstance(exc, NonRetryableError) and not isinstance(
            exc, self.spec.non_retryable
        )
        code = getattr(exc, "error_code", ErrorCode.execution_error)
        if not isinstance(code, ErrorCode):
            code = ErrorCode.execution_error
        error = self._error(
            code,
            _describe(exc),
            type_name=type(exc).__name__,
            retryable=retryable,
            tb="".join(traceback.format_exception(exc)),
        )
        return JobStatus.failed, None, error, exc

    def _timeout(
        self,
    ) -> tuple[JobStatus, Assets | None, ErrorInfo | None, BaseException | None]:
        error = self._error(
            ErrorCode.timeout,
            f"the attempt ran longer than timeout_seconds={self.job.timeout_seconds}",
            type_name="JobTimeoutError",
        )
        return JobStatus.failed, None, error, None

    def _canceled(
        self,
    ) -> tuple[JobStatus, Assets | None, ErrorInfo | None, BaseException | None]:
        error = self._error(ErrorCode.canceled, "canceled by request", retryable=False)
        return JobStatus.canceled, None, error, None

    def _error(
        self,
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
            stage=self.ctx.last_progress.stage,
            retryable=retryable,
            attempt=self.job.attempt,
            traceback=tb[-20000:] if tb else None,
        )

    def _elapsed(self, started: float) -> float:
        return self.clock.monotonic() - started

    def _finish(
        self,
        outcome: tuple[
            JobStatus, Assets | None, ErrorInfo | None, BaseException | None
        ],
        started: float,
    ) -> TaskResult:
        status, assets, error, exc = outcome
        self.mistakes.extend(self.ctx.unawaited())
        return TaskResult(
            status=status,
            assets=assets,
            error=error,
            progress=list(self.progress),
            job=self.job.model_copy(
                update={
                    "status": status,
                    "progress": self.ctx.last_progress,
                    "assets": assets,
                    "error": error,
                    "finished_at": self.clock.now(),
                }
            ),
            exception=exc,
            gpus=list(self.gpus),
            elapsed_seconds=self._elapsed(started),
            mistakes=list(self.mistakes),
        )


async def _settle(iterations: int = 5) -> None:
    """Let the runner and its helpers run until they wait on something."""
    for _ in range(iterations):
        await asyncio.sleep(0)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
