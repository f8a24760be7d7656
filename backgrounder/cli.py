"""The ``backgrounder`` command: worker, demo, jobs."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import signal
import sys
import sysconfig
import urllib.parse
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from pydantic import BaseModel
from rich.console import Console

from backgrounder.errors import BackgrounderError, ConfigurationError
from backgrounder.manager import JobManager
from backgrounder.resources import ResourceLimits
from backgrounder.settings import ManagerSettings
from backgrounder.tasks import TaskRegistry

__all__ = ["app", "load_registry", "main"]

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="backgrounder",
    help="Run backgrounder workers, the demo, and look at jobs.",
    no_args_is_help=True,
    add_completion=False,
    # Plain help wraps long option names instead of cutting them at 80 columns.
    rich_markup_mode=None,
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
    except Exception as exc:
        raise ConfigurationError(
            f"importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    if not hasattr(module, attr):
        raise ConfigurationError(
            f"module {module_name!r} has no attribute {attr!r}; name the "
            "TaskRegistry defined there, for example "
            f"{module_name}:registry"
        )
    registry = getattr(module, attr)
    if callable(registry) and not isinstance(registry, TaskRegistry):
        registry = registry()
    if not isinstance(registry, TaskRegistry):
        raise ConfigurationError(
            f"{target!r} is {type(registry).__name__}, not a TaskRegistry"
        )
    return registry


def _about(model: type[BaseModel], name: str) -> str | None:
    """A setting's one-line description, shared by the model and the help."""
    return model.model_fields[name].description


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
    lease_seconds: Annotated[
        float, typer.Option(min=0.1, help=_about(ManagerSettings, "lease_seconds"))
    ] = 30.0,
    cancel_grace_seconds: Annotated[
        float, typer.Option(min=0, help=_about(ManagerSettings, "cancel_grace_seconds"))
    ] = 5.0,
    shutdown_grace_seconds: Annotated[
        float,
        typer.Option(min=0, help=_about(ManagerSettings, "shutdown_grace_seconds")),
    ] = 10.0,
    retry_backoff_seconds: Annotated[
        float,
        typer.Option(min=0, help=_about(ManagerSettings, "retry_backoff_seconds")),
    ] = 1.0,
    retry_backoff_max_seconds: Annotated[
        float,
        typer.Option(min=0, help=_about(ManagerSettings, "retry_backoff_max_seconds")),
    ] = 300.0,
    poll_seconds: Annotated[
        float, typer.Option(min=0.01, help=_about(ManagerSettings, "poll_seconds"))
    ] = 1.0,
    max_concurrent_jobs: Annotated[
        int | None,
        typer.Option(min=1, help="Jobs running at once; can only lower --concurrency."),
    ] = None,
    max_memory_mb: Annotated[
        int | None, typer.Option(min=1, help=_about(ResourceLimits, "max_memory_mb"))
    ] = None,
    max_cpu_percent: Annotated[
        float | None,
        typer.Option(min=1, max=100, help=_about(ResourceLimits, "max_cpu_percent")),
    ] = None,
    max_gpu_memory_mb: Annotated[
        int | None,
        typer.Option(min=1, help=_about(ResourceLimits, "max_gpu_memory_mb")),
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING...")] = "INFO",
) -> None:
    """Run a worker process until SIGTERM or SIGINT, then drain and exit."""
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        typer.echo(
            f"error: --log-level must be DEBUG, INFO, WARNING or ERROR "
            f"(got {log_level!r})",
            err=True,
        )
        raise typer.Exit(2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
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
    try:
        asyncio.run(_run_worker(manager))
    except BackgrounderError as exc:
        # Start-up failures (store or queue unreachable, folder missing) are the
        # user's to fix: one line, not a traceback.
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


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


@app.command()
def demo(
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, help="Port; 0 picks a free one.")] = 8000,
    db: Annotated[Path, typer.Option(help="SQLite file of the jobs.")] = Path(
        "backgrounder-demo.db"
    ),
    folder: Annotated[
        Path | None,
        typer.Option(help="Folder to analyse; default: Python's library folder."),
    ] = None,
    pattern: Annotated[str, typer.Option(help="Glob of the files to read.")] = "*.py",
    reports: Annotated[Path, typer.Option(help="Folder for the JSON reports.")] = Path(
        "reports"
    ),
    once: Annotated[
        bool, typer.Option("--once", help="Stop after the job instead of serving on.")
    ] = False,
) -> None:
    """Serve the example app, run a corpus job on real files, show its progress."""
    console = Console(soft_wrap=True)
    target = folder or Path(sysconfig.get_paths()["stdlib"])
    params = {
        "folder": str(target.resolve()),
        "pattern": pattern,
        "top": 10,
        "output_dir": str(reports.resolve()),
    }
    from backgrounder._demo import load_demo_app, run_demo

    try:
        demo_app = load_demo_app(db, reports, shutdown_grace_seconds=3.0)
    except ConfigurationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:
        code = asyncio.run(
            run_demo(
                demo_app,
                host=host,
                port=port,
                params=params,
                once=once,
                console=console,
            )
        )
    except KeyboardInterrupt:
        console.print("stopped")
        code = 0
    raise typer.Exit(code)


jobs_app = typer.Typer(
    name="jobs", help="Look at and control jobs over HTTP.", no_args_is_help=True
)
app.add_typer(jobs_app)

UrlOption = Annotated[
    str,
    typer.Option(envvar="BACKGROUNDER_URL", help="The app's address."),
]
PrefixOption = Annotated[str, typer.Option(help="Where the routes are mounted.")]


def _call(url: str, prefix: str, method: str, path: str, **params: Any) -> None:
    """Send one request and print the JSON answer; exit 1 on an error status."""
    query = {k: v for k, v in params.items() if v is not None}
    target = f"{url.rstrip('/')}{prefix}/jobs{path}"
    try:
        response = httpx.request(method, target, params=query, timeout=30)
    except httpx.HTTPError as exc:
        typer.echo(f"error: cannot reach {target}: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text}
    typer.echo(json.dumps(body, indent=2))
    if response.status_code >= 400:
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(
    url: UrlOption = "http://127.0.0.1:8000",
    prefix: PrefixOption = "/api/v1",
    status: Annotated[str | None, typer.Option(help="Only this status.")] = None,
    task: Annotated[str | None, typer.Option(help="Only this task.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Jobs per page.")] = 20,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of a page.")] = None,
) -> None:
    """List jobs, newest first."""
    _call(url, prefix, "GET", "", status=status, task=task, limit=limit, cursor=cursor)


@jobs_app.command("get")
def jobs_get(
    job_id: str,
    url: UrlOption = "http://127.0.0.1:8000",
    prefix: PrefixOption = "/api/v1",
) -> None:
    """Show one job."""
    _call(url, prefix, "GET", f"/{_quote(job_id)}")


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: str,
    url: UrlOption = "http://127.0.0.1:8000",
    prefix: PrefixOption = "/api/v1",
) -> None:
    """Cancel a job."""
    _call(url, prefix, "POST", f"/{_quote(job_id)}/cancel")


@jobs_app.command("retry")
def jobs_retry(
    job_id: str,
    url: UrlOption = "http://127.0.0.1:8000",
    prefix: PrefixOption = "/api/v1",
) -> None:
    """Queue a failed or canceled job again."""
    _call(url, prefix, "POST", f"/{_quote(job_id)}/retry")


def _quote(job_id: str) -> str:
    """Escape a job id for a URL path, so it can only name one job."""
    return urllib.parse.quote(job_id, safe="")


def main() -> None:
    """Entry point of the ``backgrounder`` command."""
    app()


if __name__ == "__main__":
    main()
