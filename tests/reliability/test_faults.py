"""Faults a user's runner or disk can throw at a worker.

Runners that raise enormous exceptions, or return output JSON cannot carry
(NaN, bytes, sets, objects), fail with a bounded, readable error and the worker
carries on (Redis+Redis too, through the ``all_backends`` mark). A SQLite store
whose disk fills up answers with a clear error (StoreError in Python, 503 over
HTTP), keeps every stored job readable and the file intact, and serves again
once space is back.

Disk full is simulated honestly inside SQLite: ``PRAGMA max_page_count`` set to
the file's current page count on the store's own connection makes every write
that needs a new page fail with SQLITE_FULL, exactly as a full disk does.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from backgrounder import Job, JobStatus, NoopRunner, RunContext, TaskRegistry
from backgrounder.errors import StoreError
from backgrounder.fastapi import setup_backgrounder
from backgrounder.store.sqlite import SqliteStore
from tests.conftest import ManagerFactory, wait_for

TEN_MB = 10 * 1024 * 1024


class Enormous:
    """Raises an exception whose message is 10 MB."""

    async def execute(self, job: Job, ctx: RunContext) -> None:
        raise ValueError("x" * TEN_MB)


class BadOutput:
    """Returns output JSON cannot carry unchanged."""

    async def execute(self, job: Job, ctx: RunContext) -> Any:
        kind = job.params["kind"]
        return {
            "nan": {"score": float("nan")},
            "inf": [float("inf")],
            "bytes": {"blob": b"\x00\x01"},
            "set": {"ids": {1, 2}},
            "object": {"obj": object()},
            "tuple-key": {(1, 2): "x"},
        }[kind]


@pytest.mark.all_backends
async def test_enormous_exception_fails_with_a_bounded_message(
    make_manager: ManagerFactory,
) -> None:
    registry = TaskRegistry()
    registry.add("enormous", Enormous())
    registry.add("noop", NoopRunner(sleep_ms=0))
    manager = await make_manager(registry, worker_count=1)

    failed = await wait_for(manager, (await manager.submit("enormous")).id)

    assert failed.status == JobStatus.failed
    assert failed.error is not None and failed.error.type == "ValueError"
    assert 0 < len(failed.error.message) <= 10_000
    assert len(failed.model_dump_json()) < 200_000
    after = await wait_for(manager, (await manager.submit("noop")).id)
    assert after.status == JobStatus.done


@pytest.mark.all_backends
@pytest.mark.parametrize("kind", ["nan", "inf", "bytes", "set", "object", "tuple-key"])
async def test_non_json_output_fails_never_done(
    make_manager: ManagerFactory, kind: str
) -> None:
    registry = TaskRegistry()
    registry.add("bad", BadOutput())
    registry.add("noop", NoopRunner(sleep_ms=0))
    manager = await make_manager(registry, worker_count=1)

    job = await wait_for(manager, (await manager.submit("bad", {"kind": kind})).id)

    assert job.status == JobStatus.failed, job
    assert job.assets is None
    assert job.error is not None and job.error.type == "InvalidOutputError"
    assert "output" in job.error.message
    Job.model_validate_json(job.model_dump_json())
    after = await wait_for(manager, (await manager.submit("noop")).id)
    assert after.status == JobStatus.done


async def _cap(store: SqliteStore, pages: int | None) -> None:
    """Cap the file at its current size (the next new page is SQLITE_FULL),
    or lift the cap (``None``: space is back)."""
    db: Any = store._db
    if pages is None:
        await db.execute("PRAGMA max_page_count = 1073741823")
        return
    cursor = await db.execute("PRAGMA page_count")
    row = await cursor.fetchone()
    await db.execute(f"PRAGMA max_page_count = {int(row[0])}")


def _integrity(path: Path) -> str:
    with sqlite3.connect(path) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


async def test_disk_full_is_a_clear_error_and_recovers(tmp_path: Path) -> None:
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0))
    app = FastAPI()
    db_path = tmp_path / "jobs.db"
    manager = setup_backgrounder(
        app, db_path=db_path, registry=registry, worker_count=0
    )
    big = {"blob": "y" * 200_000}
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        before = [(await manager.submit("noop", {"i": i})).id for i in range(5)]
        store = manager.store
        assert isinstance(store, SqliteStore)
        await _cap(store, pages=0)

        with pytest.raises(StoreError):
            for i in range(20):
                await manager.submit("noop", {"i": i, **big})
        response = await client.post(
            "/api/v1/jobs", json={"task": "noop", "params": big}
        )
        assert response.status_code == 503, response.text
        assert response.json()["detail"]
        for job_id in before:
            assert (await client.get(f"/api/v1/jobs/{job_id}")).status_code == 200
        listed = (await client.get("/api/v1/jobs", params={"limit": 1000})).json()
        listed_ids = {job["id"] for job in listed["items"]}
        assert set(before) <= listed_ids
        assert _integrity(db_path) == "ok"

        await _cap(store, pages=None)  # space is back
        again = await client.post("/api/v1/jobs", json={"task": "noop", "params": big})
        assert again.status_code == 202, again.text
        assert (await client.get(again.headers["location"])).status_code == 200
    assert _integrity(db_path) == "ok"
