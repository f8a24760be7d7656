"""ProcessRunner: run a task in a warm child process that can be stopped for real."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from backgrounder.errors import ConfigurationError, JobCanceled
from backgrounder.isolation._pool import ChildPool, ChildProcess
from backgrounder.isolation._wire import RunnerRef, path_of
from backgrounder.isolation.errors import ChildProcessLostError, remote_error
from backgrounder.models import Assets, Job
from backgrounder.tasks import RunContext, TaskSpec

__all__ = ["ISOLATION_MODES", "ProcessRunner", "close_process_runners", "isolate"]

logger = logging.getLogger(__name__)

#: The values of the ``isolation`` option of ``TaskRegistry.add``.
ISOLATION_MODES = ("thread", "process")

#: Task defaults that TaskRegistry.add reads from a runner's attributes.
_TASK_DEFAULTS = ("timeout_seconds", "max_retries", "resources", "non_retryable")


class ProcessRunner:
    """Run a runner's ``execute`` in a child process that a timeout or cancel stops.

    ``registry.add("embed", EmbedTask(), isolation="process")`` wraps the runner
    in a ProcessRunner; so does ``registry.add("embed", ProcessRunner(EmbedTask()))``.

    Each worker process keeps a pool of warm children, started lazily with the
    *spawn* method (never fork, so CUDA is safe), one per job running at once.
    A child builds the runner once and calls its ``setup()``, runs many jobs,
    and calls ``teardown()`` when it stops. In the child, ``execute`` gets a
    context with the usual API; progress, assets and cancel requests are relayed
    over a pipe as JSON.

    A timeout, or a cancel the task ignores past ``cancel_grace_seconds``, stops
    the child: a cancel request, then SIGTERM (the job's ``finally`` blocks and
    ``teardown()`` run), then SIGKILL after ``kill_grace_seconds``. The attempt
    ends only once the child is gone, so the job's slot and resource
    reservation are held until then. A child that dies on its own (crash, out
    of memory, killed from outside) fails the attempt with error code
    ``worker_lost``; the retry runs in a new child. A job that waits for a new
    child counts its start-up and ``setup()`` against its timeout; ``prestart``
    starts children ahead of jobs.

    How the child gets the runner (nothing is pickled): the runner's class must
    be defined at module level of an importable module. The child imports it
    and makes an instance without calling ``__init__``, with the parent
    instance's attributes copied as JSON; or, given ``init_kwargs``, calls
    ``cls(**init_kwargs)``. Keep configuration in plain attributes and create
    heavy objects (models, clients, locks) in ``setup()``.

    Added in 0.1.
    """

    def __init__(
        self,
        runner: Any,
        *,
        max_jobs_per_child: int | None = None,
        kill_grace_seconds: float = 3.0,
        init_kwargs: dict[str, Any] | None = None,
        non_retryable: Sequence[type[BaseException]] | None = None,
    ) -> None:
        """Wrap ``runner``.

        Args:
            runner: The task: an instance (or a class, built in the child with
                ``init_kwargs``) with ``execute(job, ctx)``, sync or async, and
                optional ``setup()`` / ``teardown()``, sync or async.
            max_jobs_per_child: Recycle a child after this many jobs (for leaky
                libraries); None keeps it for as long as it lives.
            kill_grace_seconds: How long a child may take to stop after SIGTERM
                (and after a stop request between jobs) before SIGKILL.
            init_kwargs: JSON keyword arguments to build the runner with in the
                child, instead of copying the instance's attributes.
            non_retryable: Exception types that fail the job at once when the
                runner raises them in the child; default the runner's
                ``non_retryable`` attribute.

        Raises:
            ConfigurationError: The runner cannot be rebuilt in a child process,
                or an option is out of range.
        """
        if isinstance(runner, ProcessRunner):
            raise ConfigurationError("the runner is already a ProcessRunner")
        if not callable(getattr(runner, "execute", None)):
            raise ConfigurationError(
                f"runner {runner!r} has no execute(job, ctx) method; pass a task"
            )
        if max_jobs_per_child is not None and (
            isinstance(max_jobs_per_child, bool) or max_jobs_per_child < 1
        ):
            raise ConfigurationError(
                f"max_jobs_per_child must be an integer >= 1 or None "
                f"(got {max_jobs_per_child!r})"
            )
        if not kill_grace_seconds > 0:
            raise ConfigurationError(
                f"kill_grace_seconds must be > 0 (got {kill_grace_seconds!r})"
            )
        for name in _TASK_DEFAULTS:
            if hasattr(runner, name):
                setattr(self, name, getattr(runner, name))
        if non_retryable is None:
            non_retryable = tuple(getattr(runner, "non_retryable", ()))
        self.runner = runner
        self.max_jobs_per_child = max_jobs_per_child
        self.kill_grace_seconds = kill_grace_seconds
        self._ref = RunnerRef.of(runner, init_kwargs)
        self._config: dict[str, Any] = {
            "runner": self._ref.to_json(),
            "non_retryable": [
                path_of(kind, what="non-retryable exception") for kind in non_retryable
            ],
        }
        self._name = self._ref.path
        self._pool: ChildPool | None = None
        self._seq = itertools.count(1)

    def __repr__(self) -> str:
        return (
            f"ProcessRunner({self._name}, max_jobs_per_child={self.max_jobs_per_child})"
        )

    # ------------------------------------------------------------ public

    async def execute(self, job: Job, ctx: RunContext) -> Assets | None:
        """Run one attempt in a child process and relay its context.

        Raises:
            JobCanceled: The task stopped on a cancel request.
            ChildTaskError: The task raised; its type name, message and
                traceback come from the child.
            ChildProcessLostError: The child died during the attempt.
            asyncio.CancelledError: The worker stopped the attempt (timeout,
                cancel past its grace, shutdown); the child is gone by then.
        """
        pool = await self._current_pool()
        child = await pool.acquire(tuple(ctx.gpus), job.id)
        try:
            reply = await self._converse(child, job, ctx)
        except BaseException:
            # Canceled by the worker, or the relay failed: the child may still be
            # running the job. Stop it for real and wait until it is gone, so the
            # worker frees the slot and the reservation only after that (#7).
            await pool.end(child, polite=False)
            raise
        if reply["op"] == "exit":
            raise ChildProcessLostError(
                job_id=job.id, pid=child.pid, exitcode=child.exitcode
            )
        pool.release(child)
        if reply["op"] == "canceled":
            raise JobCanceled(f"job {job.id!r} was canceled", job_id=job.id)
        if reply["op"] == "error":
            raise remote_error(job.id, reply.get("error") or {}, setup=False)
        assets = reply.get("assets")
        return None if assets is None else Assets.model_validate(assets)

    async def prestart(self, children: int = 1, gpus: Sequence[int] = ()) -> list[int]:
        """Start children now and keep them warm (load models before jobs come).

        Args:
            children: How many children to start.
            gpus: The GPU indexes their jobs will be given (``ctx.gpus``).

        Returns:
            The pids of the children started.

        Raises:
            ProcessIsolationError: A child failed to start or to set up.
        """
        pool = await self._current_pool()
        started = await asyncio.gather(
            *(pool.spawn(tuple(gpus), job_id=None) for _ in range(children))
        )
        for child in started:
            pool.keep(child)
        return [child.pid for child in started]

    def pids(self) -> list[int]:
        """Return the pids of this runner's live children in this process."""
        return [] if self._pool is None else self._pool.pids()

    async def aclose(self) -> None:
        """Stop every child and wait until all are gone.

        Idle children stop politely (``teardown()`` runs); a child still running
        a job is stopped at once and that attempt fails with ``worker_lost``.
        The runner stays usable: a later job starts new children. The manager
        calls this when it closes.
        """
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # ------------------------------------------------------------ internals

    async def _current_pool(self) -> ChildPool:
        loop = asyncio.get_running_loop()
        pool = self._pool
        if pool is not None and pool.loop is not loop:
            # Used from a new event loop (a new asyncio.run, a new test): the
            # old loop's children cannot report here; stop them.
            self._pool = None
            await asyncio.to_thread(pool.close_sync)
            pool = self._pool
        if pool is None:
            pool = self._pool = ChildPool(
                self._config,
                name=self._name,
                max_jobs_per_child=self.max_jobs_per_child,
                kill_grace_seconds=self.kill_grace_seconds,
            )
        return pool

    async def _converse(
        self, child: ChildProcess, job: Job, ctx: RunContext
    ) -> dict[str, Any]:
        """Send the job, relay progress and assets; return the child's last word."""
        seq = child.seq = next(self._seq)
        sent = await child.send_async(
            {
                "op": "run",
                "seq": seq,
                "job": job.model_dump(mode="json"),
                "gpus": list(ctx.gpus),
            }
        )
        relay = asyncio.create_task(_relay_cancel(child, ctx, seq)) if sent else None
        try:
            while True:
                message = await child.messages.get()
                op = message.get("op")
                if op == "exit":
                    return message
                if message.get("seq") != seq:
                    continue
                if op in ("result", "canceled", "error"):
                    return message
                if op == "progress":
                    ctx.progress_nowait(
                        message["percent"],
                        message["stage"],
                        message["processed"],
                        message["total"],
                        message["message"],
                    )
                elif op == "assets":
                    await ctx.attach_assets(Assets.model_validate(message["assets"]))
        finally:
            if relay is not None:
                relay.cancel()
                await asyncio.gather(relay, return_exceptions=True)


async def _relay_cancel(child: ChildProcess, ctx: RunContext, seq: int) -> None:
    """Pass the job's cancel request on to the child when it comes.

    It waits on the context's cancel event, not on ``ctx.sleep``: a sleep on
    the job's clock would let a fake clock with auto-jump (the testing harness)
    run the clock ahead while the job waits for its child.
    """
    await ctx._cancel_signal().wait()
    child.send({"op": "cancel", "seq": seq})


async def close_process_runners(registry: Iterable[TaskSpec]) -> None:
    """Stop the child processes of every ProcessRunner in ``registry``."""
    for spec in registry:
        if isinstance(spec.runner, ProcessRunner):
            await spec.runner.aclose()


def isolate(
    runner: Any,
    *,
    task: str,
    non_retryable: Sequence[type[BaseException]],
    options: dict[str, Any],
) -> Any:
    """Apply the ``isolation`` option of ``TaskRegistry.add`` to a runner.

    Args:
        runner: The runner given to ``add``.
        task: The task name, for messages.
        non_retryable: The task's non-retryable exception types.
        options: The task's options. ``isolation`` is None or "thread" (the
            runner as is: async on the event loop, sync in a thread) or
            "process" (a ProcessRunner, with ``max_jobs_per_child``,
            ``kill_grace_seconds`` and ``init_kwargs``).

    Raises:
        ConfigurationError: An unknown mode, or a runner a child cannot rebuild.
    """
    isolation = options.get("isolation")
    if isolation is None or isolation == "thread":
        return runner
    if isolation != "process":
        raise ConfigurationError(
            f"isolation for task {task!r} must be one of {ISOLATION_MODES!r} or "
            f"None (got {isolation!r})"
        )
    if isinstance(runner, ProcessRunner):
        return runner
    try:
        return ProcessRunner(
            runner,
            max_jobs_per_child=options.get("max_jobs_per_child"),
            kill_grace_seconds=options.get("kill_grace_seconds", 3.0),
            init_kwargs=options.get("init_kwargs"),
            non_retryable=non_retryable,
        )
    except ConfigurationError as exc:
        raise ConfigurationError(f"task {task!r}: {exc}") from exc
