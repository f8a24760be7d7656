"""The runner's view under run_task: a counting clock and a watchful context."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import threading
import traceback
from collections.abc import Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from backgrounder.clock import Clock
from backgrounder.models import Assets, Job, Progress, Stage
from backgrounder.tasks import RunContext, TaskSpec

__all__ = ["HarnessContext", "TrackingClock", "caller", "origin", "runner_frames"]

OWN_DIRS = tuple(
    str(Path(module.__file__).resolve().parent) + os.sep
    for module in (sys.modules["backgrounder"], sys.modules["backgrounder_testing"])
    if module.__file__
)


class RunState(Protocol):
    """What the context reports to: the attempt run_task is running."""

    spec: TaskSpec
    progress: list[Progress]
    cancel_after: int | None

    def mistake(self, text: str) -> None:
        """Record a misuse of the runner API."""

    def request_cancel(self) -> None:
        """Deliver a cancel request (from any thread)."""


class TrackingClock:
    """The runner's view of the clock: counts the sleeps the runner is in."""

    def __init__(self, inner: Clock, activity: asyncio.Event) -> None:
        self.inner = inner
        self.sleeping = 0
        self._activity = activity

    def now(self) -> datetime:
        return self.inner.now()

    def monotonic(self) -> float:
        return self.inner.monotonic()

    def sleep(self, seconds: float) -> Coroutine[Any, Any, None]:
        # Ask the inner clock now, so a FakeClock takes the deadline at the call.
        return self._sleeping(self.inner.sleep(seconds))

    async def _sleeping(self, inner: Coroutine[Any, Any, None]) -> None:
        self.sleeping += 1
        self._activity.set()
        try:
            await inner
        finally:
            self.sleeping -= 1

    def __getattr__(self, name: str) -> Any:
        # advance(), jump_wall() and the like reach the real FakeClock.
        return getattr(self.inner, name)


class HarnessContext(RunContext):
    """A RunContext that records progress and notices misuse of the API."""

    def __init__(self, run: RunState, job: Job, **kwargs: Any) -> None:
        super().__init__(job, **kwargs)
        self._run = run
        self._lock = threading.Lock()
        self._pending: list[tuple[str, Coroutine[Any, Any, Any], str]] = []

    def progress_nowait(
        self,
        percent: float,
        stage: Stage | str | None = None,
        processed: int = 0,
        total: int = 0,
        message: str | None = None,
    ) -> Progress:
        try:
            progress = super().progress_nowait(
                percent, stage, processed, total, message
            )
        except ValueError as exc:
            call = _call_text(percent, stage, processed, total, message)
            self._run.mistake(f"{call} was refused: {exc} ({caller()})")
            raise
        with self._lock:
            self._run.progress.append(progress)
            count = len(self._run.progress)
        if count == self._run.cancel_after:
            # Visible at once to a sync runner's thread; the event follows.
            self._canceled = True
            self._run.request_cancel()
        return progress

    # The async methods hand back a coroutine that run_task checks was awaited:
    # one that never is does nothing in a worker, silently.

    def progress(
        self,
        percent: float,
        stage: Stage | str | None = None,
        processed: int = 0,
        total: int = 0,
        message: str | None = None,
    ) -> Coroutine[Any, Any, None]:
        call = _call_text(percent, stage, processed, total, message)
        return self._track(
            call, super().progress(percent, stage, processed, total, message)
        )

    def check_canceled(self) -> Coroutine[Any, Any, None]:
        return self._track("ctx.check_canceled()", super().check_canceled())

    def sleep(self, seconds: float) -> Coroutine[Any, Any, None]:
        return self._track(f"ctx.sleep({seconds!r})", super().sleep(seconds))

    def attach_assets(
        self, assets: Assets | None = None, **groups: Any
    ) -> Coroutine[Any, Any, None]:
        return self._track(
            "ctx.attach_assets(...)", super().attach_assets(assets, **groups)
        )

    def _track(
        self, call: str, coro: Coroutine[Any, Any, None]
    ) -> Coroutine[Any, Any, None]:
        with self._lock:
            self._pending = [
                entry
                for entry in self._pending
                if inspect.getcoroutinestate(entry[1]) == inspect.CORO_CREATED
            ]
            self._pending.append((call, coro, caller()))
        return coro

    def unawaited(self) -> list[str]:
        """Close the ctx coroutines never awaited; describe each one."""
        found = []
        with self._lock:
            for call, coro, where in self._pending:
                if inspect.getcoroutinestate(coro) != inspect.CORO_CREATED:
                    continue
                coro.close()
                fix = (
                    "; a sync runner runs in a thread and must call the *_nowait "
                    "variant (ctx.progress_nowait, ctx.check_canceled_nowait)"
                    if not self._run.spec.is_async
                    else "; add await"
                )
                found.append(
                    f"{call} was called without await ({where}), so it did nothing{fix}"
                )
            self._pending.clear()
        return found


def _call_text(
    percent: Any, stage: Any, processed: Any, total: Any, message: Any
) -> str:
    shown = f"Stage.{stage.name}" if isinstance(stage, Stage) else repr(stage)
    args = [repr(percent), shown]
    if processed or total:
        args += [repr(processed), repr(total)]
    if message is not None:
        args.append(f"message={message!r}")
    return f"ctx.progress({', '.join(args)})"


def caller() -> str:
    """Return ``file:line`` of the nearest frame outside backgrounder's packages."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(OWN_DIRS) and "asyncio" not in filename:
            return f"{Path(filename).name}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return "unknown location"


def runner_frames(exc: BaseException, limit: int = 3) -> list[str]:
    """Describe ``exc`` and the runner's own frames it passed, newest last."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(OWN_DIRS)
    ][-limit:]
    lines = [f"the runner raised {traceback.format_exception_only(exc)[-1].strip()}"]
    for frame in frames:
        code = f": {frame.line.strip()}" if frame.line else ""
        lines.append(
            f"  {Path(frame.filename).name}:{frame.lineno} in {frame.name}{code}"
        )
    return lines


def origin(exc: BaseException) -> str:
    """Return where the runner raised ``exc``, as ``file:line``, or ''."""
    frames = traceback.extract_tb(exc.__traceback__)
    for summary in reversed(frames):
        if not summary.filename.startswith(OWN_DIRS):
            return f"raised at {Path(summary.filename).name}:{summary.lineno}"
    return ""
