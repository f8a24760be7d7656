"""The main loop of a child process: build the runner once, run jobs sent as JSON.

Two threads. The main thread builds the runner, calls ``setup()``, runs one job
at a time (sync runners directly, async ones on the child's own event loop) and
calls ``teardown()`` on the way out. A reader thread takes messages from the
worker: jobs go to the main thread's inbox, cancel requests set the flag of the
job they name at once, so a sync runner sees them in ``check_canceled_nowait()``.

SIGTERM is the worker's polite stop: it raises ``_Terminated`` in the main
thread, so the job's ``finally`` blocks and ``teardown()`` run; the worker sends
SIGKILL if that takes longer than its grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Sequence
from multiprocessing.connection import Connection
from types import FrameType
from typing import Any

from backgrounder._json import check_json
from backgrounder.errors import InvalidParamsError, JobCanceled
from backgrounder.isolation._wire import (
    RunnerRef,
    decode,
    describe_exception,
    encode,
    import_object,
)
from backgrounder.models import Assets, Job, Progress, Stage
from backgrounder.resources import cuda_env
from backgrounder.tasks import RunContext

__all__ = ["child_main"]

logger = logging.getLogger(__name__)

#: How long a child whose worker died waits for its job to unwind before it exits.
_ORPHAN_GRACE_SECONDS = 10.0


class _Terminated(SystemExit):
    """Raised in the main thread on SIGTERM: unwind the job, tear down, exit."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(128 + signum)


def child_main(conn: Connection, config_text: str) -> None:
    """Run in a new child process until the worker says stop or goes away.

    Args:
        conn: This end of the pipe to the worker.
        config_text: JSON: the runner reference, the GPUs, non-retryable types.
    """
    config = json.loads(config_text)
    gpus = config.get("gpus") or []
    if gpus:
        # Before the runner's module or setup() can touch CUDA (#7). A job given
        # no GPUs keeps the worker's own setting.
        os.environ.update(cuda_env(gpus))
    sys.exit(_Child(conn, config).main())


class _ChildContext(RunContext):
    """The context a runner gets in a child process; it relays to the worker.

    Built on the child's event loop, like the worker builds its own. Progress
    and assets go to the worker as messages; the worker's cancel request
    arrives on the reader thread, hence the thread-safe ``request_cancel``.
    """

    def __init__(
        self, job: Job, *, gpus: Sequence[int], seq: int, child: _Child
    ) -> None:
        """Build the context of job number ``seq`` in this child."""
        super().__init__(job, gpus=gpus, assets_sink=self._relay_assets)
        self.seq = seq
        self._child = child

    def progress_nowait(
        self,
        percent: float,
        stage: Stage | str | None = None,
        processed: int = 0,
        total: int = 0,
        message: str | None = None,
    ) -> Progress:
        """Record progress and send it to the worker; safe from any thread."""
        progress = self._validate(percent, stage, processed, total, message)
        self._progress = progress
        self._child.send(
            {
                "op": "progress",
                "seq": self.seq,
                "percent": progress.percent,
                "stage": progress.stage.value,
                "processed": progress.processed,
                "total": progress.total,
                "message": progress.message,
            }
        )
        return progress

    def request_cancel(self) -> None:
        """Mark the job canceled; called from the reader thread."""
        self._canceled = True
        try:
            # On the loop: the event is made there if need be, and set (canceled).
            self._loop.call_soon_threadsafe(self._cancel_signal)
        except RuntimeError:  # the child's loop is closed: it is exiting
            pass

    async def _relay_assets(self, assets: Assets) -> None:
        payload = assets.model_dump(mode="json")
        check_json(payload, path="assets", max_depth=64)
        self._child.send({"op": "assets", "seq": self.seq, "assets": payload})


class _Child:
    """One child process: its pipe, its runner, the job it runs."""

    def __init__(self, conn: Connection, config: dict[str, Any]) -> None:
        self._conn = conn
        self._config = config
        self._send_lock = threading.Lock()
        self._inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._loop = asyncio.new_event_loop()
        self._current: _ChildContext | None = None
        self._canceled_seq = -1
        self._non_retryable: tuple[type[BaseException], ...] = ()

    def send(self, message: dict[str, Any]) -> None:
        """Send one message to the worker; a worker that is gone is not an error."""
        data = encode(message)
        with self._send_lock:
            try:
                self._conn.send_bytes(data)
            except OSError:
                pass

    # ------------------------------------------------------------ lifecycle

    def main(self) -> int:
        """Set up, serve jobs until told to stop, tear down; return the exit code."""
        signal.signal(signal.SIGTERM, _on_sigterm)
        threading.Thread(
            target=self._read, name="backgrounder-child-reader", daemon=True
        ).start()
        try:
            runner = self._start()
        except Exception as exc:
            self.send({"op": "setup_failed", "error": describe_exception(exc, ())})
            return 1
        self.send({"op": "ready", "pid": os.getpid()})
        try:
            while (message := self._inbox.get()) is not None:
                if message.get("op") == "stop":
                    break
                if message.get("op") == "run":
                    self._run(runner, message)
        finally:
            self._call_hook(runner, "teardown")
        return 0

    def _start(self) -> Any:
        self._non_retryable = tuple(
            import_object(*path.split(":", 1))
            for path in self._config.get("non_retryable", [])
        )
        runner = RunnerRef.from_json(self._config["runner"]).build()
        self._call_hook(runner, "setup", raise_errors=True)
        return runner

    def _call_hook(self, runner: Any, name: str, *, raise_errors: bool = False) -> None:
        hook = getattr(runner, name, None)
        if not callable(hook):
            return
        try:
            result = hook()
            if inspect.isawaitable(result):
                self._await(result)
        except Exception:
            if raise_errors:
                raise
            # teardown is best effort: the child exits either way.
            logger.warning("%s() of the runner failed", name, exc_info=True)

    # ------------------------------------------------------------ reader thread

    def _read(self) -> None:
        while True:
            try:
                message = decode(self._conn.recv_bytes())
            except (EOFError, OSError, ValueError):
                break
            if message.get("op") == "cancel":
                self._cancel(int(message.get("seq", -1)))
            else:
                self._inbox.put(message)
        # The worker closed the pipe: it died or gave up on us. Stop taking jobs,
        # stop the one running (politely, then for good).
        self._inbox.put(None)
        if self._current is not None:
            self._current.request_cancel()
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(_ORPHAN_GRACE_SECONDS)
        os._exit(1)

    def _cancel(self, seq: int) -> None:
        # Written before reading _current, while the main thread writes _current
        # before reading _canceled_seq: one of them sees the other (#7).
        self._canceled_seq = seq
        current = self._current
        if current is not None and current.seq == seq:
            current.request_cancel()

    # ------------------------------------------------------------ one job

    def _run(self, runner: Any, message: dict[str, Any]) -> None:
        seq = int(message["seq"])
        reply: dict[str, Any]
        try:
            job = Job.model_validate(message["job"])
            ctx = self._await(self._context(job, message.get("gpus") or [], seq))
        except Exception as exc:
            self.send({"op": "error", "seq": seq, "error": describe_exception(exc, ())})
            return
        self._current = ctx
        if self._canceled_seq == seq:
            ctx.request_cancel()
        try:
            value = self._execute(runner, job, ctx)
            reply = {"op": "result", "seq": seq, "assets": _output(value)}
        except JobCanceled:
            reply = {"op": "canceled", "seq": seq}
        except asyncio.CancelledError as exc:
            if ctx.canceled:
                reply = {"op": "canceled", "seq": seq}
            else:
                reply = {
                    "op": "error",
                    "seq": seq,
                    "error": describe_exception(exc, ()),
                }
        except _BadOutputError as exc:
            error = describe_exception(exc, ())
            error.update(type="InvalidOutputError", retryable=False)
            reply = {"op": "error", "seq": seq, "error": error}
        except Exception as exc:
            error = describe_exception(exc, self._non_retryable)
            reply = {"op": "error", "seq": seq, "error": error}
        finally:
            self._current = None
        self.send(reply)

    async def _context(self, job: Job, gpus: Sequence[int], seq: int) -> _ChildContext:
        return _ChildContext(job, gpus=gpus, seq=seq, child=self)

    def _execute(self, runner: Any, job: Job, ctx: _ChildContext) -> Any:
        if inspect.iscoroutinefunction(runner.execute):
            return self._await(runner.execute(job, ctx))
        value = runner.execute(job, ctx)
        if inspect.isawaitable(value):
            value = self._await(value)
        return value

    def _await(self, awaitable: Awaitable[Any]) -> Any:
        """Run ``awaitable`` on the child's loop; on SIGTERM, cancel it first."""
        task = asyncio.ensure_future(awaitable, loop=self._loop)
        try:
            return self._loop.run_until_complete(task)
        except _Terminated:
            # SIGTERM arrived while the loop waited: cancel the task so its
            # finally blocks run, then go on exiting.
            if not task.done():
                task.cancel()
                # Whatever the task ends with, the child is exiting.
                with contextlib.suppress(BaseException):
                    self._loop.run_until_complete(task)
            raise


class _BadOutputError(Exception):
    """The runner returned something that is not Assets, a JSON dict or None."""


def _output(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, Assets):
        payload = value.model_dump(mode="json")
    elif isinstance(value, dict):
        payload = {"custom": value}
    else:
        raise _BadOutputError(
            f"execute returned a {type(value).__name__}; return Assets, a dict of "
            "JSON values, or None"
        )
    try:
        check_json(payload, path="output", max_depth=64)
    except InvalidParamsError as exc:
        raise _BadOutputError(
            f"the runner returned output that is not JSON: {exc}"
        ) from None
    return payload
