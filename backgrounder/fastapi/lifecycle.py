"""setup_backgrounder: a JobManager started and drained by the app's lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.params import Depends as DependsParam

from backgrounder.clock import Clock
from backgrounder.errors import ConfigurationError
from backgrounder.fastapi.router import STATE_KEY, create_router
from backgrounder.manager import JobManager
from backgrounder.metrics import PrometheusMetrics
from backgrounder.queue.base import JobQueue
from backgrounder.resources import ResourceLimits
from backgrounder.store.base import JobStore
from backgrounder.tasks import TaskRegistry

__all__ = ["setup_backgrounder"]

logger = logging.getLogger(__name__)

#: The ``app.state`` attribute that holds the app's PrometheusMetrics, if any.
METRICS_STATE_KEY = "backgrounder_metrics"

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]


def setup_backgrounder(
    app: FastAPI,
    *,
    db_path: str | Path | None = None,
    store: JobStore | str | None = None,
    queue: JobQueue | str | None = None,
    registry: TaskRegistry | None = None,
    resource_limits: ResourceLimits | None = None,
    include_router: bool = True,
    prefix: str = "/api/v1",
    worker_count: int = 1,
    plugins: Iterable[object] | None = None,
    dependencies: Sequence[DependsParam] | None = None,
    clock: Clock | None = None,
    dashboard: bool = False,
    metrics: bool | PrometheusMetrics = False,
    **manager_options: Any,
) -> JobManager:
    """Give ``app`` a JobManager that its lifespan starts and drains.

    The manager starts before the app's own lifespan and closes after it, so
    the app's start-up code can already submit jobs; both lifespans run and the
    app's state is kept. A manager that cannot start (an unwritable ``db_path``,
    Redis down) fails the app's start with the reason, leaving nothing running.
    At shutdown the workers stop claiming and running jobs get
    ``shutdown_grace_seconds`` to finish; ``POST /jobs`` answers 503 meanwhile.

    Args:
        app: The FastAPI app.
        db_path: SQLite file of the embedded store (default ``backgrounder.db``).
        store: A JobStore or a store URL, instead of ``db_path``.
        queue: A JobQueue or a queue URL (default ``memory://``).
        registry: The tasks this app runs.
        resource_limits: Limits of this process's workers.
        include_router: Mount the routes of ``create_router`` at ``prefix``.
        prefix: Where the routes go (``/api/v1/jobs/...``).
        worker_count: Jobs this process runs at once; 0 for an API-only process.
        plugins: Extra plugin objects.
        dependencies: FastAPI dependencies run before every route (auth).
        clock: The clock (tests pass a FakeClock).
        dashboard: Serve the dashboard at ``{prefix}/jobs/_dashboard``, behind
            ``dependencies`` like every route. Off by default.
        metrics: True (or a PrometheusMetrics) to count job events and serve
            them at ``{prefix}/jobs/_metrics``; needs the ``metrics`` extra.
            The object is also at ``app.state.backgrounder_metrics``.
        **manager_options: Other ManagerSettings fields (lease_seconds,
            cancel_grace_seconds, shutdown_grace_seconds, expose_tracebacks...).

    Returns:
        The manager, also at ``app.state.backgrounder``; routes get it with the
        ``get_manager`` dependency.

    Raises:
        ConfigurationError: An option is invalid, the app is already set up,
            or ``metrics`` is asked for without prometheus-client installed.

    Added in 0.1.
    """
    if isinstance(getattr(app.state, STATE_KEY, None), JobManager):
        raise ConfigurationError(
            "setup_backgrounder was already called for this app; call it once"
        )
    exporter = _metrics(metrics)
    if exporter is not None:
        plugins = [*(plugins or ()), exporter]
        setattr(app.state, METRICS_STATE_KEY, exporter)
    manager = JobManager(
        store=store,
        queue=queue,
        db_path=db_path,
        registry=registry,
        resource_limits=resource_limits,
        plugins=plugins,
        clock=clock,
        worker_count=worker_count,
        **manager_options,
    )
    setattr(app.state, STATE_KEY, manager)
    app.router.lifespan_context = _compose(manager, app.router.lifespan_context)
    if include_router:
        router = create_router(
            dependencies=dependencies, dashboard=dashboard, metrics=exporter
        )
        app.include_router(router, prefix=prefix)
    return manager


def _metrics(metrics: bool | PrometheusMetrics) -> PrometheusMetrics | None:
    if isinstance(metrics, PrometheusMetrics):
        return metrics
    # Built now, so a missing prometheus-client fails the app's set-up with the
    # command that installs it, not the first scrape.
    return PrometheusMetrics() if metrics else None


def _compose(manager: JobManager, inner: Lifespan) -> Lifespan:
    """Return a lifespan that runs the manager around the app's own lifespan."""

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        await _start(manager)
        try:
            async with inner(app) as state:
                yield state
        finally:
            await manager.close()

    return lifespan


async def _start(manager: JobManager) -> None:
    try:
        await manager.start()
    except BaseException as exc:
        # start() closes what it opened when it fails early; this also stops
        # workers and tasks begun before a later step failed.
        await manager.close(drain=False)
        logger.error(
            "backgrounder could not start, so the app does not start: %s",
            exc,
            extra={"event": "manager.start_failed"},
        )
        raise
