"""Runners, the task registry, and the context a runner works with."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from backgrounder.clock import Clock, SystemClock
from backgrounder.errors import ConfigurationError, JobCanceled
from backgrounder.models import Assets, Job, Progress, ResourceRequest, Stage

__all__ = [
    "DEFAULT",
    "NoopRunner",
    "RunContext",
    "Runner",
    "TaskRegistry",
    "TaskSpec",
]

logger = logging.getLogger(__name__)


class _Default:
    """Marks an option left out, as distinct from an explicit None."""

    _instance: _Default | None = None

    def __new__(cls) -> _Default:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFAULT"

    def __bool__(self) -> bool:
        return False


#: Pass (or leave) an option as DEFAULT to take the task's, then the manager's value.
DEFAULT: Any = _Default()


@runtime_checkable
class Runner(Protocol):
    """What a task is: an object with ``execute(job, ctx)``.

    ``execute`` may be ``async def`` (runs on the event loop; cancel and timeout
    stop it at its next await) or plain ``def`` (runs in a thread, keeps its slot
    until it returns; use ``ctx.progress_nowait`` and ``ctx.check_canceled_nowait``
    there). It returns an ``Assets``, a dict (stored as ``Assets(custom=...)``) or
    None.

    Optional attributes give task defaults: ``timeout_seconds``, ``max_retries``,
    ``resources`` (a ResourceRequest or dict) and ``non_retryable`` (exception types
    that fail the job at once).
    """

    def execute(self, job: Job, ctx: RunContext) -> Any:
        """Do the work of one attempt."""
        ...


ProgressSink = Callable[[Progress], None]
AssetsSink = Callable[[Assets], Awaitable[None]]


class RunContext:
    """What a runner gets besides the job: progress, cancellation, outputs, time.

    Progress is recorded in memory and reaches subscribers at once; store writes
    are coalesced by the worker, and the last progress is always written with the
    job's final status.
    """

    def __init__(
        self,
        job: Job,
        *,
        clock: Clock | None = None,
        gpus: Sequence[int] = (),
        progress_sink: ProgressSink | None = None,
        assets_sink: AssetsSink | None = None,
    ) -> None:
        """Build a context; the worker (or a test harness) supplies the sinks."""
        self.job = job
        self.clock: Clock = clock or SystemClock()
        self.gpus: list[int] = list(gpus)
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None
        self._progress_sink = progress_sink
        self._assets_sink = assets_sink
        self._progress = job.progress
        self._assets: Assets | None = job.assets
        self._canceled = False
        self._cancel_event: asyncio.Event | None = None
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose records carry the job id, attempt and task."""
        if self._logger is None:
            job = self.job
            self._logger = logging.LoggerAdapter(
                logging.getLogger("backgrounder.task"),
                {"job_id": job.id, "attempt": job.attempt, "task": job.task},
            )
        return self._logger

    @property
    def attempt(self) -> int:
        """The attempt being run, 1-based; use it to make effects idempotent."""
        return self.job.attempt

    @property
    def canceled(self) -> bool:
        """True once a cancel has been requested for this job."""
        return self._canceled

    @property
    def last_progress(self) -> Progress:
        """The last progress reported."""
        return self._progress

    @property
    def assets(self) -> Assets:
        """The outputs attached so far."""
        if self._assets is None:
            self._assets = Assets()
        return self._assets

    @property
    def attached_assets(self) -> Assets | None:
        """The outputs attached so far, or None when there are none."""
        assets = self._assets
        return None if assets is None or assets.is_empty() else assets

    def request_cancel(self) -> None:
        """Mark the job canceled (called by the worker, from the event loop)."""
        self._canceled = True
        if self._cancel_event is not None:
            self._cancel_event.set()

    def progress_nowait(
        self,
        percent: float,
        stage: Stage | str | None = None,
        processed: int = 0,
        total: int = 0,
        message: str | None = None,
    ) -> Progress:
        """Record progress without waiting; safe to call from a sync runner's thread.

        Args:
            percent: 0 to 100; it may go down when a new stage starts its count.
            stage: A Stage (or its value); None keeps the current stage.
            processed: Items done in this stage.
            total: Items in this stage; 0 when unknown.
            message: A short note for people watching.

        Raises:
            ValueError: A value is out of range or the stage is not a Stage.
        """
        progress = self._validate(percent, stage, processed, total, message)
        self._progress = progress
        if self._progress_sink is not None:
            if threading.get_ident() == self._loop_thread:
                self._progress_sink(progress)
            else:
                self._loop.call_soon_threadsafe(self._progress_sink, progress)
        return progress

    async def progress(
        self,
        percent: float,
        stage: Stage | str | None = None,
        processed: int = 0,
        total: int = 0,
        message: str | None = None,
    ) -> None:
        """Report progress: ``await ctx.progress(10, Stage.fetch, 1, 10)``.

        See ``progress_nowait`` for the arguments and errors. It yields to the
        event loop once, so a runner reporting progress in a tight loop still lets
        heartbeats, store writes and cancel requests through.
        """
        self.progress_nowait(percent, stage, processed, total, message)
        await asyncio.sleep(0)

    def _validate(
        self,
        percent: float,
        stage: Stage | str | None,
        processed: int,
        total: int,
        message: str | None,
    ) -> Progress:
        if isinstance(percent, bool) or not isinstance(percent, int | float):
            raise ValueError(f"percent must be a number 0-100 (got {percent!r})")
        if not 0 <= percent <= 100:
            raise ValueError(f"percent must be between 0 and 100 (got {percent!r})")
        if stage is None:
            stage = self._progress.stage
        elif not isinstance(stage, Stage):
            try:
                stage = Stage(stage)
            except ValueError:
                names = ", ".join(s.value for s in Stage)
                raise ValueError(
                    f"stage must be a Stage ({names}); got {stage!r}"
                ) from None
        for name, value in (("processed", processed), ("total", total)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (got {value!r})")
        if total and processed > total:
            raise ValueError(
                f"processed ({processed}) must not be greater than total ({total})"
            )
        if message is not None and not isinstance(message, str):
            raise ValueError(f"message must be a string or None (got {message!r})")
        return Progress(
            percent=float(percent),
            stage=stage,
            processed=processed,
            total=total,
            message=message,
            updated_at=self.clock.now(),
        )

    def check_canceled_nowait(self) -> None:
        """Raise JobCanceled if a cancel was requested; safe from any thread."""
        if self._canceled:
            raise JobCanceled(f"job {self.job.id!r} was canceled", job_id=self.job.id)

    async def check_canceled(self) -> None:
        """Raise JobCanceled if a cancel was requested; let it propagate.

        It yields to the event loop once, so a loop that only checks for cancel
        still lets the cancel request arrive.
        """
        self.check_canceled_nowait()
        await asyncio.sleep(0)
        self.check_canceled_nowait()

    async def sleep(self, seconds: float) -> None:
        """Sleep on the job's clock; a cancel request wakes it with JobCanceled."""
        self.check_canceled_nowait()
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        waiter = asyncio.ensure_future(self._cancel_signal().wait())
        try:
            await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waiter.cancel()
        self.check_canceled_nowait()

    def _cancel_signal(self) -> asyncio.Event:
        """The event set on cancel, made on first use (most jobs never wait)."""
        if self._cancel_event is None:
            self._cancel_event = asyncio.Event()
            if self._canceled:
                self._cancel_event.set()
        return self._cancel_event

    async def attach_assets(self, assets: Assets | None = None, **groups: Any) -> None:
        """Save outputs as they appear; later calls add to (and override) earlier.

        ``await ctx.attach_assets(custom={"chunk-1": {"href": path}})`` or pass an
        ``Assets``. Values must be JSON.
        """
        merged = self.assets.model_dump()
        extra = assets.model_dump() if assets is not None else {}
        for name, group in {**extra, **groups}.items():
            if isinstance(group, dict) and isinstance(merged.get(name), dict):
                merged[name] = {**merged[name], **group}
            else:
                merged[name] = group
        self._assets = Assets.model_validate(merged)
        if self._assets_sink is not None:
            await self._assets_sink(self._assets)


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its runner and its defaults."""

    name: str
    runner: Any
    timeout_seconds: float | Any | None = DEFAULT
    max_retries: int | None = None
    resources: ResourceRequest | None = None
    non_retryable: tuple[type[BaseException], ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_async(self) -> bool:
        """True when ``execute`` is a coroutine function."""
        return inspect.iscoroutinefunction(self.runner.execute)


class TaskRegistry:
    """Names mapped to runners: ``registry.add("embed", EmbedTask())``."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskSpec] = {}

    def add(
        self,
        name: str,
        runner: Any,
        *,
        timeout_seconds: float | Any | None = DEFAULT,
        max_retries: int | None = None,
        resources: ResourceRequest | dict[str, Any] | None = None,
        non_retryable: Sequence[type[BaseException]] = (),
        **options: Any,
    ) -> TaskSpec:
        """Register ``runner`` under ``name``; options override its attributes.

        ``isolation="process"`` runs the task in a warm child process that a
        timeout or cancel stops for real (see ``backgrounder.isolation``), with
        the options ``max_jobs_per_child``, ``kill_grace_seconds`` and
        ``init_kwargs``.

        Raises:
            ConfigurationError: The name is taken or empty, or the runner has no
                ``execute`` method, or an option is out of range.
        """
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"task name must be a non-empty string ({name!r})")
        if name in self._tasks:
            raise ConfigurationError(f"task {name!r} is already registered")
        if isinstance(runner, type) or not callable(getattr(runner, "execute", None)):
            raise ConfigurationError(
                f"runner for task {name!r} has no execute(job, ctx) method "
                f"(got {type(runner).__name__}); pass an instance, not the class"
                if isinstance(runner, type)
                else f"runner for task {name!r} has no execute(job, ctx) method "
                f"(got {type(runner).__name__})"
            )
        if timeout_seconds is DEFAULT:
            timeout_seconds = getattr(runner, "timeout_seconds", DEFAULT)
        if timeout_seconds is not DEFAULT and timeout_seconds is not None:
            if not timeout_seconds > 0:
                raise ConfigurationError(
                    f"timeout_seconds for task {name!r} must be > 0 "
                    f"(got {timeout_seconds!r}); use None for no limit"
                )
        if max_retries is None:
            max_retries = getattr(runner, "max_retries", None)
        if max_retries is not None and max_retries < 0:
            raise ConfigurationError(
                f"max_retries for task {name!r} must be >= 0 (got {max_retries!r})"
            )
        if resources is None:
            resources = getattr(runner, "resources", None)
        if isinstance(resources, dict):
            resources = ResourceRequest.model_validate(resources)
        non_retryable = tuple(non_retryable) or tuple(
            getattr(runner, "non_retryable", ())
        )
        if options.get("isolation") is not None:
            from backgrounder.isolation import isolate

            runner = isolate(
                runner, task=name, non_retryable=non_retryable, options=options
            )
        spec = TaskSpec(
            name=name,
            runner=runner,
            timeout_seconds=timeout_seconds,
            max_retries=max_retries,
            resources=resources,
            non_retryable=non_retryable,
            options=dict(options),
        )
        self._tasks[name] = spec
        return spec

    def get(self, name: str) -> TaskSpec | None:
        """Return the task registered as ``name``, or None."""
        return self._tasks.get(name)

    def names(self) -> list[str]:
        """Return the registered names, sorted."""
        return sorted(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)

    def __repr__(self) -> str:
        return f"TaskRegistry({self.names()!r})"


class NoopRunner:
    """Walk the stages with progress and do nothing else: for demos and tests."""

    def __init__(self, sleep_ms: float = 25, stages: int = 5) -> None:
        """Build a runner.

        Args:
            sleep_ms: Time spent in each stage, on the job's clock.
            stages: How many stages to walk, from ``fetch`` on (1 to 6).
        """
        if sleep_ms < 0:
            raise ValueError(f"sleep_ms must be >= 0 (got {sleep_ms!r})")
        if not 1 <= stages <= len(Stage) - 1:
            raise ValueError(f"stages must be 1 to {len(Stage) - 1} (got {stages!r})")
        self.sleep_ms = sleep_ms
        self.stages = stages

    def __repr__(self) -> str:
        return f"NoopRunner(sleep_ms={self.sleep_ms}, stages={self.stages})"

    async def execute(self, job: Job, ctx: RunContext) -> Assets:
        """Report each stage, sleep in it, and return the stage count."""
        walked = list(Stage)[1 : self.stages + 1]
        for index, stage in enumerate(walked):
            await ctx.check_canceled()
            await ctx.progress(
                100 * index / len(walked), stage, index, len(walked), f"{stage} started"
            )
            if self.sleep_ms:
                await ctx.sleep(self.sleep_ms / 1000)
        await ctx.progress(100, walked[-1], len(walked), len(walked), "finished")
        return Assets(custom={"stages": len(walked)})
