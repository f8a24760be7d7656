"""The README's code and commands work as written."""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import uvicorn

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> dict[str, str]:
    """Return the README's ``language`` blocks that start with ``# <file name>``."""
    blocks = {}
    for body in re.findall(rf"```{language}\n(.*?)```", README, re.S):
        first = body.splitlines()[0]
        if first.startswith("# ") and first.endswith(".py"):
            blocks[first[2:]] = body
    return blocks


@pytest.fixture
def readme_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Write the README's Python files into a folder that is the cwd and on sys.path."""
    for name, body in code_blocks("python").items():
        (tmp_path / name).write_text(body)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("app", "wordcount", "test_wordcount"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def load(name: str) -> ModuleType:
    __import__(name)
    return sys.modules[name]


@contextmanager
def uvicorn_serving(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free loopback port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def run_to_end(base: str, body: dict[str, Any]) -> dict[str, Any]:
    """Submit over HTTP and follow the job's event stream to its last event."""
    with httpx.Client(base_url=base, timeout=10) as client:
        response = client.post("/api/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        last: dict[str, Any] = {}
        with client.stream("GET", f"/api/v1/jobs/{response.json()['id']}/events") as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    last = json.loads(line[6:])
    return last


def test_readme_has_the_files_it_promises() -> None:
    """The README shows app.py, wordcount.py and test_wordcount.py."""
    assert set(code_blocks("python")) == {"app.py", "wordcount.py", "test_wordcount.py"}


def test_readme_quick_start_serves_jobs_to_done(readme_code: Path) -> None:
    """The quick start, pasted into app.py and run under uvicorn, runs a job."""
    with uvicorn_serving(load("app").app) as base:
        job = run_to_end(base, {"task": "noop"})
    assert job["status"] == "done"
    assert (readme_code / "jobs.db").exists()


def test_readme_custom_task_serves_jobs_to_done(readme_code: Path) -> None:
    """The custom task, pasted into wordcount.py, counts words under uvicorn."""
    with uvicorn_serving(load("wordcount").app) as base:
        job = run_to_end(
            base, {"task": "wordcount", "params": {"text": "one two\nthree"}}
        )
        bad = run_to_end(base, {"task": "wordcount", "params": {}})
    assert job["status"] == "done"
    assert job["assets"]["custom"]["result"] == {"lines": 2, "words": 3}
    assert bad["status"] == "failed"
    assert "params.text is required" in bad["error"]["message"]


async def test_readme_task_test_passes(readme_code: Path, tmp_path: Path) -> None:
    """The README's example test passes as written."""
    module = load("test_wordcount")
    (tmp_path / "run").mkdir()
    await module.test_wordcount_counts_lines_and_words(tmp_path / "run")


def test_readme_two_commands_and_ci_agree() -> None:
    """The README's set-up commands are the nox sessions .ci/run and nox define."""
    demo = "python3 -m pip install nox && python3 -m nox -s demo"
    tests = "python3 -m pip install nox && python3 -m nox -s tests"
    assert demo in README and tests in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m pip install -q nox" in ci
    assert ci.rstrip().endswith("python3 -m nox -s tests")
    noxfile = (ROOT / "noxfile.py").read_text()
    assert "def demo(" in noxfile and "def tests(" in noxfile
