"""The ``backgrounder`` command: worker, demo, jobs."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
from typing import Annotated

import typer

from backgrounder.errors import ConfigurationError
from backgrounder.manager import JobManager
from backgrounder.resources import ResourceLimits
from backgrounder.tasks import TaskRegistry

__all__ = ["app", "load_registry", "main"]

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="backgrounder",
    help="Run backgrounder workers, the demo, and look at jobs.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Run backgrounder workers, the demo, and look at jobs."""


def load_registry(target: str) -> TaskRegistry:
    """Import ``MODULE:ATTR`` and return the TaskRegistry it names.

    Raises:
        ConfigurationError: The module or attribute is missing, or not a registry.
    """
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(
            f"expected MODULE:ATTR naming a TaskRegistry (got {target!r}), "
            "for example myapp.tasks:registry"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    registry = getattr(module, attr, None)
    if callable(registry) and not isinstance(registry, TaskRegistry):
        registry = registry()
    if not isinstance(registry, TaskRegistry):
        raise ConfigurationError(
            f"{target!r} is {type(registry).__name__}, not a TaskRegistry"
        )
    return registry


@app.command()
def worker(
    target: Annotated[str, typer.Argument(help="MODULE:ATTR of a TaskRegistry.")],
    store: Annotated[
        str, typer.Option(envvar="BACKGROUNDER_STORE", help="Store URL.")
    ] = "sqlite:///backgrounder.db",
    queue: Annotated[
        str, typer.Option(envvar="BACKGROUNDER_QUEUE", help="Queue URL.")
    ] = "memory://",
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs at once.")] = 10,
    worker_id: Annotated[
        str | None, typer.Option(help="Worker id; default host:pid:suffix.")
    ] = None,
    lease_seconds: Annotated[float, typer.Option(min=0.1)] = 30.0,
    cancel_grace_seconds: Annotated[float, typer.Option(min=0)] = 5.0,
    shutdown_grace_seconds: Annotated[float, typer.Option(min=0)] = 10.0,
    retry_backoff_seconds: Annotated[float, typer.Option(min=0)] = 1.0,
    retry_backoff_max_seconds: Annotated[float, typer.Option(min=0)] = 300.0,
    poll_seconds: Annotated[float, typer.Option(min=0.01)] = 1.0,
    max_concurrent_jobs: Annotated[int | None, typer.Option(min=1)] = None,
    max_memory_mb: Annotated[int | None, typer.Option(min=1)] = None,
    max_cpu_percent: Annotated[float | None, typer.Option(min=1, max=100)] = None,
    max_gpu_memory_mb: Annotated[int | None, typer.Option(min=1)] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING...")] = "INFO",
) -> None:
    """Run a worker process until SIGTERM or SIGINT, then drain and exit."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        registry = load_registry(target)
        limits = ResourceLimits(
            max_concurrent_jobs=max_concurrent_jobs,
            max_memory_mb=max_memory_mb,
            max_cpu_percent=max_cpu_percent,
            max_gpu_memory_mb=max_gpu_memory_mb,
        )
        manager = JobManager(
            store=store,
            queue=queue,
            registry=registry,
            resource_limits=limits,
            worker_id=worker_id,
            worker_count=concurrency,
            lease_seconds=lease_seconds,
            cancel_grace_seconds=cancel_grace_seconds,
            shutdown_grace_seconds=shutdown_grace_seconds,
            retry_backoff_seconds=retry_backoff_seconds,
            retry_backoff_max_seconds=retry_backoff_max_seconds,
            poll_seconds=poll_seconds,
        )
    except (ConfigurationError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    asyncio.run(_run_worker(manager))


async def _run_worker(manager: JobManager) -> None:
    """Start the manager, wait for a signal, drain; a second signal stops at once."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            logger.warning("second signal: stopping without draining")
            os._exit(1)
        logger.info("signal %d: draining, send it again to stop at once", signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await manager.start()
    try:
        await stop.wait()
    finally:
        await manager.close()


def main() -> None:
    """Entry point of the ``backgrounder`` command."""
    app()


if __name__ == "__main__":
    main()
