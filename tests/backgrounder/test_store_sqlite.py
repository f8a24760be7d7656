"""SqliteStore: field-scoped writes and compare-and-set, as the worker relies on."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Generator
from datetime import timedelta
from pathlib import Path

import pytest

from backgrounder.models import Job, JobStatus, Progress, Stage
from backgrounder.store.sqlite import SqliteStore
from backgrounder_testing import FakeClock


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "jobs.db")
    await opened.open(clock)
    yield opened
    await opened.close()


def _job(clock: FakeClock, job_id: str = "j1", **fields: object) -> Job:
    now = clock.now()
    return Job(id=job_id, task="t", created_at=now, updated_at=now, **fields)  # type: ignore[arg-type]


async def test_store_progress_write_keeps_cancel_requested(
    store: SqliteStore, clock: FakeClock
) -> None:
    """A progress write names only progress: a cancel request survives it."""
    await store.create(_job(clock, status=JobStatus.running, attempt=1))
    await store.update("j1", {"cancel_requested": True})

    after = await store.update(
        "j1",
        {"progress": Progress(percent=50, stage=Stage.infer)},
        expect_status={JobStatus.running},
        expect_attempt=1,
    )

    assert after is not None
    assert after.cancel_requested is True
    assert after.progress.percent == 50


async def test_store_cas_on_cancel_requested(
    store: SqliteStore, clock: FakeClock
) -> None:
    """expect_cancel_requested=False refuses the write once a cancel was asked."""
    await store.create(_job(clock, status=JobStatus.running))
    await store.update("j1", {"cancel_requested": True})

    refused = await store.update(
        "j1", {"status": JobStatus.done}, expect_cancel_requested=False
    )
    allowed = await store.update(
        "j1", {"status": JobStatus.canceled}, expect_cancel_requested=True
    )

    assert refused is None
    assert allowed is not None and allowed.status == JobStatus.canceled


async def test_store_cas_on_attempt_and_worker(
    store: SqliteStore, clock: FakeClock
) -> None:
    """A write for another attempt or worker changes nothing."""
    await store.create(_job(clock, status=JobStatus.running, attempt=2, worker_id="w2"))

    stale_attempt = await store.update(
        "j1", {"status": JobStatus.done}, expect_attempt=1, expect_worker="w2"
    )
    stale_worker = await store.update(
        "j1", {"status": JobStatus.done}, expect_attempt=2, expect_worker="w1"
    )

    assert stale_attempt is None and stale_worker is None
    job = await store.get("j1")
    assert job is not None and job.status == JobStatus.running


async def test_store_expired_idempotency_key_is_released(
    store: SqliteStore, clock: FakeClock
) -> None:
    """After its TTL a key makes a new job; before it, the old one comes back."""
    ttl = clock.now() + timedelta(seconds=60)
    first, made = await store.create(
        _job(clock, "a", idempotency_key="k"), idempotency_expires_at=ttl
    )
    again, made_again = await store.create(
        _job(clock, "b", idempotency_key="k"), idempotency_expires_at=ttl
    )
    clock.advance(61)
    later, made_later = await store.create(
        _job(clock, "c", idempotency_key="k"),
        idempotency_expires_at=clock.now() + timedelta(seconds=60),
    )

    assert (made, made_again, made_later) == (True, False, True)
    assert again.id == first.id == "a"
    assert later.id == "c"


async def test_log_is_copied_into_the_file_in_the_background(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A steady trickle of writes reaches the database file while the store is
    open, well before SQLite's own 1,000-page checkpoint on the write path."""
    path = tmp_path / "jobs.db"
    store = SqliteStore(path)
    await store.open(clock)
    try:
        empty = path.stat().st_size
        for i in range(120):
            await store.create(_job(clock, f"j{i}"))
        async with asyncio.timeout(10):
            while path.stat().st_size <= empty:
                await asyncio.sleep(0.01)  # polls the file; no timing is assumed
    finally:
        await store.close()


async def test_close_waits_for_a_checkpoint_and_leaves_no_thread(
    tmp_path: Path, clock: FakeClock
) -> None:
    def threads() -> set[threading.Thread]:
        # The loop's executor keeps its threads for reuse: not the store's.
        return {t for t in threading.enumerate() if not t.name.startswith("asyncio_")}

    before = threads()
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open(clock)
    await asyncio.gather(*(store.create(_job(clock, f"j{i}")) for i in range(300)))
    await store.close()
    assert threads() <= before
    again = SqliteStore(tmp_path / "jobs.db")
    await again.open(clock)
    try:
        assert (await again.count_by_status())[JobStatus.queued] == 300
    finally:
        await again.close()


class _CheckpointRecorder:
    """Stands in for the checkpoint connection: records what it is asked to run
    and answers the PASSIVE checkpoint with a log of ``log_frames`` frames."""

    def __init__(self, log_frames: int) -> None:
        self.log_frames = log_frames
        self.statements: list[str] = []

    def execute(self, sql: str) -> _CheckpointRecorder:
        self.statements.append(sql)
        return self

    async def __aenter__(self) -> _CheckpointRecorder:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def fetchone(self) -> tuple[int, int, int]:
        return (0, self.log_frames, self.log_frames)

    def __await__(self) -> Generator[None, None, _CheckpointRecorder]:
        yield from asyncio.sleep(0).__await__()
        return self


@pytest.mark.parametrize(("log_frames", "restart"), [(200, False), (1500, True)])
async def test_a_log_that_passive_checkpoints_let_grow_is_started_over(
    store: SqliteStore, log_frames: int, restart: bool
) -> None:
    """Under writes that never pause a passive checkpoint never lets the log
    start over; once it has reached the writer's own threshold, a RESTART
    checkpoint (writers wait a moment) follows."""
    real = store._checkpointer
    recorder = _CheckpointRecorder(log_frames)
    store._checkpointer = recorder  # type: ignore[assignment]
    try:
        await store._run_checkpoint()
    finally:
        store._checkpointer = real
    expected = ["PRAGMA wal_checkpoint(PASSIVE)"]
    if restart:
        expected.append("PRAGMA wal_checkpoint(RESTART)")
    assert recorder.statements == expected
