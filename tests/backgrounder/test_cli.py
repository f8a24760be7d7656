"""The ``backgrounder`` command: jobs list/get/cancel/retry, worker options."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest
import typer
import uvicorn
from typer.testing import CliRunner

from backgrounder.cli import app as cli
from examples.app import create_app


@pytest.fixture
def server_url(tmp_path: Path) -> Iterator[str]:
    """Serve the demo app (no workers) on a free loopback port in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    # The socket listens before uvicorn starts, so early requests wait in its
    # backlog until the app's lifespan has run; no polling for readiness.
    app = create_app(db_path=tmp_path / "jobs.db", worker_count=0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_cli_jobs_list_get_cancel_retry(server_url: str) -> None:
    """The jobs commands print the server's JSON answers for each action."""
    job = httpx.post(f"{server_url}/api/v1/jobs", json={"task": "noop"}).json()

    code, listed = run("jobs", "list", "--url", server_url, "--status", "queued")
    assert code == 0
    assert [j["id"] for j in json.loads(listed)["items"]] == [job["id"]]

    code, got = run("jobs", "get", job["id"], "--url", server_url)
    assert code == 0
    assert json.loads(got)["status"] == "queued"

    code, canceled = run("jobs", "cancel", job["id"], "--url", server_url)
    assert code == 0
    assert json.loads(canceled)["status"] == "canceled"

    code, retried = run("jobs", "retry", job["id"], "--url", server_url)
    assert code == 0
    assert json.loads(retried)["attempt"] == 2


def test_cli_jobs_error_answers_exit_1_with_the_detail(server_url: str) -> None:
    """A 404 or a 422 exits 1 and prints the server's detail."""
    code, output = run("jobs", "get", "nope", "--url", server_url)
    assert code == 1
    assert "not found" in json.loads(output)["detail"]

    code, output = run("jobs", "list", "--url", server_url, "--status", "bogus")
    assert code == 1
    assert "status must be one of" in json.loads(output)["detail"]


def test_cli_jobs_unreachable_server_exits_2() -> None:
    """A server that does not answer is reported with its address."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    code, output = run("jobs", "list", "--url", f"http://127.0.0.1:{port}")
    assert code == 2
    assert f"127.0.0.1:{port}" in output


def test_cli_worker_command_is_still_there() -> None:
    """`backgrounder worker` keeps its options and refuses a bad target clearly."""
    code, output = run("worker", "--help")
    assert code == 0
    assert "--lease-seconds" in output
    code, output = run("worker", "no_colon_here")
    assert code == 2
    assert "MODULE:ATTR" in output


def test_cli_worker_help_shows_every_option_whole_and_explained() -> None:
    """In an 80-column terminal every option keeps its whole name, and each one
    says what it does."""
    result = CliRunner().invoke(cli, ["worker", "--help"], terminal_width=80)
    assert result.exit_code == 0
    command = typer.main.get_command(cli).commands["worker"]  # type: ignore[attr-defined]
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.opts[0] in result.output
            assert param.help, f"{param.opts[0]} has no help"
    assert "…" not in result.output
    assert "--help <bool>" not in result.output


def test_cli_help_lists_demo_and_jobs() -> None:
    """The top-level help names every command."""
    code, output = run("--help")
    assert code == 0
    for command in ("worker", "demo", "jobs"):
        assert command in output


def test_cli_worker_names_a_missing_registry_attribute() -> None:
    """A target whose module lacks the attribute says so, not "is NoneType"."""
    code, output = run("worker", "examples.app:nope")
    assert code == 2
    assert "module 'examples.app' has no attribute 'nope'" in output
    assert "NoneType" not in output


def test_cli_worker_names_the_module_whose_import_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module that raises on import is named with the exception's type."""
    (tmp_path / "badtasks.py").write_text("raise ValueError('bad import')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, output = run("worker", "badtasks:registry")
    assert code == 2
    assert "importing 'badtasks' raised ValueError: bad import" in output
