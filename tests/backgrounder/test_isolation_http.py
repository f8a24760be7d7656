"""Case B11 over HTTP: reads answer while a process-isolated task burns CPU (#7)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path

import pytest

from backgrounder import NoopRunner, TaskRegistry
from backgrounder.isolation import ProcessRunner
from tests.backgrounder import _isolation_tasks as tasks
from tests.backgrounder._isolation_support import child_pid, gone
from tests.backgrounder._isolation_support import (  # an autouse fixture
    no_child_left_behind as no_child_left_behind,
)
from tests.conftest import BackendPair
from tests.integration.test_http import API, make_app, serve, wait_status


@pytest.mark.all_backends
async def test_b11_http_polls_answer_and_quick_job_finishes_during_block(
    tmp_path: Path, backend_pair: BackendPair
) -> None:
    """A 50 ms poller gets every answer and a quick job finishes during the block.

    ``cpu_block`` busy-loops in a child with timeout_seconds=1: it ends failed
    (timeout) and its child is gone.
    """
    registry = TaskRegistry()
    spec = registry.add(
        "cpu_block", tasks.BusyLoop(), isolation="process", timeout_seconds=1
    )
    registry.add("quick", NoopRunner(sleep_ms=0, stages=1))
    app, manager = make_app(tmp_path, registry, worker_count=2, **backend_pair())
    assert isinstance(spec.runner, ProcessRunner)
    async with serve(app) as client:
        await spec.runner.prestart()
        block = (await client.post(API, json={"task": "cpu_block"})).json()
        pid = await child_pid(manager, block["id"])
        quick = (await client.post(API, json={"task": "quick"})).json()

        answers = []
        while True:  # the case's poller: GET every 50 ms while the block runs
            response = await client.get(f"{API}/{block['id']}")
            answers.append(response.status_code)
            if response.json()["status"] != "running":
                break
            await asyncio.sleep(0.05)
        ended = await wait_status(client, block["id"], "failed")
        done = await wait_status(client, quick["id"], "done")

    assert set(answers) == {200}
    assert ended["error"]["code"] == "timeout"
    assert ended["assets"] is None
    assert datetime.fromisoformat(done["finished_at"]) < datetime.fromisoformat(
        ended["finished_at"]
    )
    assert gone(pid)
