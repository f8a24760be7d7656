"""Cases B36, B38, B44 and B47 over HTTP, with the app's lifespan running."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backgrounder import Job, RunContext, Stage, Worker
from backgrounder._json import dumps
from backgrounder.errors import QueueError
from backgrounder.store.sqlite import SqliteStore
from tests.conftest import BackendPair
from tests.integration.test_http import (
    API,
    Gate,
    make_app,
    make_registry,
    read_events,
    serve,
    until,
    wait_status,
)

# ---------------------------------------------------------------- B36


@pytest.mark.all_backends
async def test_b36b_worker_loop_crash_is_logged_and_restarted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, backend_pair: BackendPair
) -> None:
    """A claim loop that raises is logged with its worker id and jobs carry on."""
    app, manager = make_app(tmp_path, **backend_pair())
    async with serve(app) as client:
        claim = manager.queue.claim_many
        crashed = asyncio.Event()

        async def broken_claim(**kwargs: Any) -> list[str]:
            if not crashed.is_set():
                crashed.set()
                raise RuntimeError("queue plugin bug")
            return await claim(**kwargs)

        # The worker claims through claim_many (a queue may not route it via claim).
        manager.queue.claim_many = broken_claim  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="backgrounder.worker"):
            job = (await client.post(API, json={"task": "noop"})).json()
            await crashed.wait()
            done = await wait_status(client, job["id"], "done")
            health = (await client.get(f"{API}/_health")).json()

    assert done["status"] == "done"
    crashes = [
        r for r in caplog.records if getattr(r, "event", "") == "worker.loop_crashed"
    ]
    assert crashes and crashes[0].exc_info is not None
    assert crashes[0].worker_id == manager.worker.worker_id  # type: ignore[attr-defined]
    assert health["worker"]["restarts"] == 1


@pytest.mark.all_backends
async def test_b36c_submit_stores_and_queues_before_answering(
    tmp_path: Path, backend_pair: BackendPair
) -> None:
    """A 202 means the job is stored; one whose push failed is queued by recovery.

    The store is the truth: once the job is stored the submit is accepted (a 503
    would make a client's retry submit it twice), and the recovery pass puts a
    queued job that missed its push on the queue.
    """
    app, manager = make_app(tmp_path, worker_count=0, **backend_pair())
    async with serve(app) as client:
        accepted = (await client.post(API, json={"task": "noop"})).json()
        assert await manager.queue.size() == 1
        assert (await manager.get(accepted["id"])).status == "queued"

        real_push = manager.queue.push

        async def broken_push(*args: Any, **kwargs: Any) -> None:
            raise QueueError("queue 'memory' refused the push")

        manager.queue.push = broken_push  # type: ignore[method-assign]
        stored = await client.post(API, json={"task": "noop"})
        manager.queue.push = real_push  # type: ignore[method-assign]
        assert stored.status_code == 202
        job_id = stored.json()["id"]
        assert (await manager.get(job_id)).status == "queued"
        assert await manager.queue.size() == 1

        await manager.restore_queue()
        assert await manager.queue.size() == 2


# ---------------------------------------------------------------- B38


class Steps:
    """Report (10, infer, 1, 10) ... (100, write, 10, 10); try invalid calls."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    async def execute(self, job: Job, ctx: RunContext) -> None:
        for step in range(1, 11):
            stage = Stage.write if step == 10 else Stage.infer
            await ctx.progress(step * 10, stage, step, 10, f"step {step}")
            if step == 5:
                for bad in (
                    lambda: ctx.progress_nowait(150, Stage.infer, 5, 10),
                    lambda: ctx.progress_nowait(50, Stage.infer, 11, 10),
                    lambda: ctx.progress_nowait(-1, Stage.infer, 5, 10),
                    lambda: ctx.progress_nowait(50, Stage.infer, -2, 10),
                    lambda: ctx.progress_nowait(50, "sideways", 5, 10),
                ):
                    try:
                        bad()
                    except ValueError as exc:
                        self.refused.append(str(exc))
            for _ in range(3):
                await asyncio.sleep(0)


@pytest.mark.all_backends
async def test_b38_progress_seen_by_pollers_never_goes_down(
    tmp_path: Path, backend_pair: BackendPair
) -> None:
    """GET pollers and the stream see progress rise to 100/write/10 of 10."""
    steps = Steps()
    app, _ = make_app(tmp_path, make_registry(steps=steps), **backend_pair())
    async with serve(app) as client:
        job = (await client.post(API, json={"task": "steps"})).json()
        stream = asyncio.ensure_future(read_events(client, job["id"]))
        polled: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while not polled or polled[-1]["status"] != "done":
                polled.append((await client.get(f"{API}/{job['id']}")).json())
        events = await stream

    for seen in (
        [p["progress"] for p in polled],
        [e["data"]["progress"] for e in events],
    ):
        percents = [p["percent"] for p in seen]
        assert percents == sorted(percents)
        last = seen[-1]
        assert (last["percent"], last["stage"]) == (100, "write")
        assert (last["processed"], last["total"]) == (10, 10)
        assert last["updated_at"] is not None
    assert len(steps.refused) == 5
    assert polled[-1]["error"] is None


# ---------------------------------------------------------------- B44


async def test_b44_hundred_megabyte_body_is_413_unread(tmp_path: Path) -> None:
    """A 100 MB body is refused with the limit named; nothing is stored."""
    app, manager = make_app(tmp_path, worker_count=0)
    limit = manager.settings.max_params_bytes
    chunk = b"x" * (1 << 20)
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"task": "noop", "params": {"blob": "'
        for _ in range(100):
            sent += 1
            yield chunk
        yield b'"}}'

    async with serve(app) as client:
        streamed = await client.post(API, content=body())
        declared = await client.post(
            API,
            content=b"{}",
            headers={"content-length": str(100 << 20)},
        )
        stored = (await client.get(API)).json()["items"]

    for response in (streamed, declared):
        assert response.status_code == 413
        assert f"{limit} bytes" in response.json()["detail"]
        assert "max_params_bytes" in response.json()["detail"]
    assert sent <= 2, f"the server read {sent} MB of a body it refused"
    assert stored == []


@pytest.mark.all_backends
async def test_b44_params_just_under_the_limit_reach_the_runner_unchanged(
    tmp_path: Path, backend_pair: BackendPair
) -> None:
    """Params 1 KB under max_params_bytes are accepted and arrive identical."""
    gate = Gate()
    gate.release.set()
    app, manager = make_app(tmp_path, make_registry(gate=gate), **backend_pair())
    limit = manager.settings.max_params_bytes
    params: dict[str, Any] = {"big": 2**60 + 1, "text": "héllo ✓", "nested": {"a": [1]}}
    params["blob"] = ""
    params["blob"] = "y" * (limit - 1024 - len(dumps(params).encode()))
    assert len(dumps(params).encode()) == limit - 1024

    async with serve(app) as client:
        response = await client.post(API, json={"task": "gate", "params": params})
        assert response.status_code == 202
        await wait_status(client, response.json()["id"], "done")

    assert gate.params == [params]
    assert isinstance(gate.params[0]["big"], int)


@pytest.mark.parametrize(
    ("depth", "items"), [(100, 10_000), (100_000, 1)], ids=["100-deep", "100k-deep"]
)
async def test_b44_deep_params_are_422_with_the_depth_limit(
    tmp_path: Path, depth: int, items: int
) -> None:
    """Deeply nested params answer 422 naming max_params_depth, never a 500."""
    app, manager = make_app(tmp_path, worker_count=0)
    inner = ", ".join(["0"] * items)
    body = '{"task": "noop", "params": {"deep": ' + "[" * depth + inner + "]" * depth
    async with serve(app) as client:
        response = await client.post(API, content=(body + "}}").encode())
        stored = (await client.get(API)).json()["items"]
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert f"{manager.settings.max_params_depth} levels" in detail
    assert "max_params_depth" in detail
    assert stored == []


# ---------------------------------------------------------------- B47


class _Crash(BaseException):
    """Kills the claim loop outright, past its supervisor."""


@pytest.mark.all_backends
async def test_b47_health_503_when_worker_dies_and_200_after_restart(
    tmp_path: Path, backend_pair: BackendPair
) -> None:
    """A dead worker turns _health 503 at once; a restarted one turns it 200."""
    app, manager = make_app(tmp_path, **backend_pair())
    async with serve(app) as client:
        assert (await client.get(f"{API}/_health")).status_code == 200
        claim = manager.queue.claim_many
        killed = False

        async def deadly_claim(**kwargs: Any) -> list[str]:
            nonlocal killed
            if not killed:
                killed = True
                raise _Crash
            return await claim(**kwargs)

        manager.queue.claim_many = deadly_claim  # type: ignore[method-assign]
        await until(lambda: not manager.worker.status()["alive"])
        dead = await client.get(f"{API}/_health")

        await manager.worker.stop(drain=False)
        manager.worker = Worker(manager, concurrency=1)
        await manager.worker.start()
        alive = await client.get(f"{API}/_health")
        job = (await client.post(API, json={"task": "noop"})).json()
        done = await wait_status(client, job["id"], "done")

    assert dead.status_code == 503
    assert dead.json()["ok"] is False
    assert dead.json()["worker"]["ok"] is False
    assert dead.json()["worker"]["alive"] is False
    assert dead.json()["store"]["ok"] is True
    assert alive.status_code == 200
    assert done["status"] == "done"


async def test_b47_health_503_when_store_is_not_writable(tmp_path: Path) -> None:
    """A store that cannot take a write lock turns _health 503 naming the store."""
    path = tmp_path / "jobs.db"
    store = SqliteStore(path, busy_timeout_seconds=0.05)
    app, _ = make_app(tmp_path, worker_count=0, store=store)
    async with serve(app) as client:
        assert (await client.get(f"{API}/_health")).status_code == 200
        blocker = sqlite3.connect(path, timeout=0, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            down = await client.get(f"{API}/_health")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        back = await client.get(f"{API}/_health")

    assert down.status_code == 503
    body = down.json()
    assert body["store"]["ok"] is False
    assert "not writable" in body["store"]["error"]
    assert body["queue"]["ok"] is True
    assert back.status_code == 200


@pytest.mark.all_backends
async def test_b47_health_503_when_queue_is_unreachable(
    tmp_path: Path, backend_pair: BackendPair
) -> None:
    """A queue whose ping fails turns _health 503 naming the queue."""
    app, manager = make_app(tmp_path, worker_count=0, **backend_pair())
    async with serve(app) as client:

        async def down() -> None:
            raise QueueError("queue 'redis://127.0.0.1:1' is unreachable")

        manager.queue.ping = down  # type: ignore[method-assign]
        response = await client.get(f"{API}/_health")
    assert response.status_code == 503
    assert response.json()["queue"] == {
        "name": manager.queue.name,
        "ok": False,
        "error": "queue 'redis://127.0.0.1:1' is unreachable",
    }


async def test_http_client_sees_no_500_for_garbage(tmp_path: Path) -> None:
    """Odd bodies (bytes that are not UTF-8, deep objects) never reach a 500."""
    app, _ = make_app(tmp_path, worker_count=0)
    async with serve(app) as client:
        for body in (b"\xff\xfe\x00", b'{"task": "noop", "params": ' + b'{"a":' * 5000):
            response = await client.post(API, content=body)
            assert response.status_code == 422, body[:20]
            assert isinstance(response.json()["detail"], str)
    assert isinstance(client, httpx.AsyncClient)
