"""Hook specifications: how plugins add stores, queues, probes, tasks and listeners."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from backgrounder.models import JobEvent
    from backgrounder.queue.base import JobQueue
    from backgrounder.resources.probes import ResourceProbe
    from backgrounder.store.base import JobStore
    from backgrounder.tasks import TaskRegistry

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]

PROJECT_NAME = "backgrounder"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# ---------------------------------------------------------------- startup


@hookspec(firstresult=True)
def backgrounder_create_store(url: str) -> JobStore | None:
    """Build the job store a URL names.

    Called once when a JobManager is built with ``store=`` (or ``db_path=``) as a URL.
    Implemented by backend plugins.

    Args:
        url: The store URL, such as ``sqlite:///jobs.db`` or ``redis://host/0``.

    Returns:
        A store for a scheme the plugin knows, else None to let another plugin
        answer; the first non-None wins.

    Added in 0.1.
    """


@hookspec(firstresult=True)
def backgrounder_create_queue(url: str) -> JobQueue | None:
    """Build the queue a URL names.

    Called once when a JobManager is built with ``queue=`` as a URL. Implemented by
    backend plugins.

    Args:
        url: The queue URL, such as ``memory://`` or ``redis://host/0?prefix=app``.

    Returns:
        A queue for a scheme the plugin knows, else None; the first non-None wins.

    Added in 0.1.
    """


@hookspec
def backgrounder_resource_probes() -> list[ResourceProbe]:  # type: ignore[empty-body]
    """Return the resource probes this plugin offers (host memory and CPU, GPUs).

    Called once when a worker's ResourceManager starts. Every plugin's probes are read.

    Returns:
        A list of probes; an empty list offers none.

    Added in 0.1.
    """


@hookspec
def backgrounder_register_tasks(registry: TaskRegistry) -> None:
    """Add an installed package's runners to the registry.

    Called once when a JobManager starts, before any job is submitted or run.

    Args:
        registry: The manager's task registry; call ``registry.add(name, runner)``.

    Added in 0.1.
    """


# ---------------------------------------------------------------- run


@hookspec
def backgrounder_job_event(event: JobEvent) -> None:
    """Receive every lifecycle and progress event (for logs, metrics, streams).

    Called in the process where the event happened, on the event loop; keep it
    quick. An implementation that raises is logged and the event goes on to the rest.
    May be ``async def``; the call is awaited.

    Args:
        event: What happened (``kind`` is 'status' or 'progress') and the job after it.

    Added in 0.1.
    """
