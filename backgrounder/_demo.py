"""The ``backgrounder demo`` command: serve the example app and watch a real job."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from backgrounder.errors import ConfigurationError

__all__ = ["load_demo_app", "run_demo"]

TERMINAL = ("done", "failed", "canceled")


def load_demo_app(db_path: Path, output_dir: Path, **options: Any) -> FastAPI:
    """Build the app of ``examples/app.py`` on the embedded default.

    The examples live in the source checkout, next to the package.

    Raises:
        ConfigurationError: The examples folder cannot be found.
    """
    checkout = Path(__file__).resolve().parent.parent
    for root in (Path.cwd(), checkout):
        if (root / "examples" / "app.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            break
    try:
        module = importlib.import_module("examples.app")
    except ImportError as exc:
        raise ConfigurationError(
            f"the demo needs the examples/ folder of a backgrounder checkout ({exc}); "
            "run it from a clone of the repository"
        ) from exc
    app: FastAPI = module.create_app(db_path=db_path, output_dir=output_dir, **options)
    return app


class _Server(uvicorn.Server):
    """A uvicorn server whose Ctrl-C stops it cleanly inside our event loop.

    uvicorn re-raises the signal after its shutdown, which would interrupt
    ``asyncio.run`` before the lifespan has closed the job manager; here the
    first Ctrl-C asks for a graceful stop (and runs ``on_exit``, which ends
    the demo's own client), the second forces it.
    """

    on_exit: list[Callable[[], object]]

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()

        first: list[float] = []

        def stop() -> None:
            # One Ctrl-C can arrive twice (from the terminal and forwarded by a
            # parent such as nox): only a second press a moment later forces.
            now = loop.time()
            if self.should_exit and first and now - first[0] > 1.0:
                self.force_exit = True
            if not first:
                first.append(now)
            self.should_exit = True
            for callback in getattr(self, "on_exit", ()):
                callback()

        installed = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, stop)
                installed.append(signum)
        try:
            yield
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)


async def run_demo(
    app: FastAPI,
    *,
    host: str,
    port: int,
    params: dict[str, Any],
    once: bool,
    console: Console,
) -> int:
    """Serve ``app``, submit a corpus job over HTTP, show it live; return 0 if done.

    With ``once`` the server stops after the job; otherwise it serves until
    Ctrl-C so the curl calls of the README can be tried. Whatever happens, the
    server is awaited to its end, so the app's lifespan closes the job manager
    (and its store's thread) before the process exits.
    """
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3
    )
    server = _Server(config)
    try:
        sock = _bind(host, port)
    except OSError as exc:
        console.print(
            f"[red]cannot serve on {host}:{port}:[/] {exc}; pass --port with a free "
            "port (0 picks one)"
        )
        return 2
    serving = asyncio.create_task(
        server.serve(sockets=[sock]), name="backgrounder-demo-server"
    )
    while not server.started:
        if serving.done():
            await serving
            return 1
        await asyncio.sleep(0.05)
    base = f"http://{host}:{sock.getsockname()[1]}"
    console.print(f"[bold]backgrounder demo[/] serving at {base}  (docs: {base}/docs)")

    watcher = asyncio.create_task(_submit_and_watch(base, params, console))

    def stopping() -> None:
        if watcher.done():
            console.print(
                "stopping: finishing open requests and closing the job store "
                "(a few seconds)"
            )
        watcher.cancel()

    server.on_exit = [stopping]
    code = 1
    try:
        code = await watcher
    except asyncio.CancelledError:
        console.print(
            "stopping; a job still running is put back in the queue and goes on "
            "at the next start"
        )
    except httpx.HTTPError as exc:
        console.print(f"[red]lost the connection to the demo server:[/] {exc}")
        server.should_exit = True
    if once:
        server.should_exit = True
    elif not server.should_exit:
        console.print(
            f"\nStill serving at {base}; try the README's curl calls, e.g.\n"
            f"  curl -s {base}/api/v1/jobs?limit=2\n"
            f"or open the dashboard: {base}/api/v1/jobs/_dashboard\n"
            "Press Ctrl-C to stop."
        )
    await serving
    sock.close()
    return code


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so a busy port is a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def _submit_and_watch(base: str, params: dict[str, Any], console: Console) -> int:
    api = f"{base}/api/v1/jobs"
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
        response = await client.post(api, json={"task": "corpus", "params": params})
        if response.status_code not in (200, 202):
            console.print(
                f"[red]submit failed ({response.status_code}):[/] {response.text}"
            )
            return 1
        job = response.json()
        console.print(
            f"submitted corpus job [bold]{job['id']}[/] over {params['folder']}\n"
            f"  watch:  curl -N {api}/{job['id']}/events\n"
            f"  cancel: curl -X POST {api}/{job['id']}/cancel"
        )
        final = await _show_progress(client, f"{api}/{job['id']}/events", console)
    return _report(final, console)


async def _show_progress(
    client: httpx.AsyncClient, url: str, console: Console
) -> dict[str, Any]:
    """Draw one bar per stage from the job's event stream; return the last job."""
    columns = (
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}", style="dim"),
        TimeElapsedColumn(),
    )
    if not console.is_terminal:
        return await _print_progress(client, url, console)
    bars: dict[str, TaskID] = {}
    last: dict[str, Any] = {}
    with Progress(*columns, console=console, transient=False) as progress:
        async for job in _events(client, url):
            last = job
            info = job["progress"]
            stage = info["stage"]
            if job["status"] in TERMINAL and stage not in bars:
                break
            if stage == "idle":
                continue
            if stage not in bars:
                for other in bars.values():
                    task = progress.tasks[other]
                    progress.update(
                        other, completed=task.total or 1, total=task.total or 1
                    )
                bars[stage] = progress.add_task(stage, total=None, note="")
            total = info["total"] or None
            note = (info["message"] or "")[-40:]
            progress.update(
                bars[stage], completed=info["processed"], total=total, note=note
            )
            if job["status"] in TERMINAL:
                break
    return last


async def _print_progress(
    client: httpx.AsyncClient, url: str, console: Console
) -> dict[str, Any]:
    """Print a line per stage and per tenth of the way, for logs and pipes."""
    last: dict[str, Any] = {}
    shown: tuple[str, int] | None = None
    async for job in _events(client, url):
        last = job
        info = job["progress"]
        mark = (info["stage"], int(info["percent"] // 10))
        if mark != shown and info["stage"] != "idle":
            shown = mark
            console.print(
                f"{info['stage']:<12} {info['percent']:5.1f}%  "
                f"{info['processed']}/{info['total']}  {info['message'] or ''}"
            )
        if job["status"] in TERMINAL:
            break
    return last


async def _events(client: httpx.AsyncClient, url: str) -> AsyncIterator[dict[str, Any]]:
    async with client.stream("GET", url) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                yield json.loads(line[6:])


def _report(job: dict[str, Any], console: Console) -> int:
    status = job.get("status")
    if status == "canceled":
        # Canceled on request (the curl line printed above): not a failure.
        console.print(f"[yellow]job {job.get('id')} canceled[/]")
        return 0
    if status != "done":
        error = job.get("error") or {}
        console.print(
            f"[red]job {job.get('id')} ended {status}:[/] {error.get('message')}"
        )
        return 1
    report = job["assets"]["custom"]["report"]
    terms = ", ".join(f"{t} ({n})" for t, n in report["top_terms"])
    console.print(
        f"[green]done[/]: {report['files']} files, {report['lines']} lines, "
        f"{report['words']} words; top terms: {terms}\n"
        f"report: [bold]{report['href']}[/]"
    )
    return 0
