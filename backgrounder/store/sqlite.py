"""The SQLite job store (aiosqlite), the embedded default; a built-in plugin."""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import sqlite3
import threading
from collections.abc import Collection, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiosqlite

from backgrounder.clock import Clock, SystemClock
from backgrounder.errors import ConfigurationError, StoreError
from backgrounder.hookspecs import hookimpl
from backgrounder.models import Job, JobPage, JobStatus
from backgrounder.store.base import (
    APPEND_ERROR,
    JobStore,
    decode_row,
    encode_field,
    to_epoch,
)

__all__ = ["SqliteStore", "path_from_url"]

logger = logging.getLogger(__name__)

_COLUMNS = [
    "id",
    "task",
    "params",
    "status",
    "priority",
    "attempt",
    "retries",
    "max_retries",
    "timeout_seconds",
    "idempotency_key",
    "resources",
    "progress",
    "assets",
    "error",
    "errors",
    "cancel_requested",
    "worker_id",
    "lease_expires_at",
    "run_after",
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
]
_SELECT = "SELECT seq, " + ", ".join(_COLUMNS) + " FROM jobs"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    task TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    retries INTEGER NOT NULL DEFAULT 0,
    max_retries INTEGER NOT NULL,
    timeout_seconds REAL,
    idempotency_key TEXT,
    idempotency_expires_at REAL,
    resources TEXT,
    progress TEXT NOT NULL,
    assets TEXT,
    error TEXT,
    errors TEXT NOT NULL DEFAULT '[]',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    lease_expires_at REAL,
    run_after REAL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency_key
    ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_task_seq ON jobs (task, seq);
CREATE INDEX IF NOT EXISTS jobs_running_lease ON jobs (lease_expires_at)
    WHERE status = 'running';
CREATE INDEX IF NOT EXISTS jobs_queued_updated ON jobs (updated_at)
    WHERE status = 'queued';
"""


def path_from_url(url: str) -> str:
    """Return the file path of a ``sqlite://`` URL.

    ``sqlite:///jobs.db`` is relative, ``sqlite:////var/lib/app/jobs.db`` absolute,
    as SQLAlchemy writes them; ``sqlite://:memory:`` keeps the store in memory.
    """
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"not a sqlite URL: {url!r}")
    if parts.netloc == ":memory:" or parts.path in ("/:memory:", ""):
        return ":memory:"
    path = unquote(parts.path)
    return path[1:] if path.startswith("/") else path


def _parent_dir(path: str) -> str | None:
    """Return the absolute folder of ``path`` if it exists, else None."""
    parent = os.path.dirname(os.path.abspath(path))
    return parent if os.path.isdir(parent) else None


class SqliteStore(JobStore):
    """Jobs in one SQLite file, in WAL mode, shared safely by several processes.

    Every update is one statement (compare-and-set in its WHERE clause); the one
    read-then-write (an expired idempotency key) takes the write lock up front with
    ``BEGIN IMMEDIATE``, so SQLite's busy timeout applies to it.
    """

    name = "sqlite"

    def __init__(self, path: str | Path, *, busy_timeout_seconds: float = 30.0) -> None:
        """Keep the path; nothing is opened until ``open()``.

        Args:
            path: The database file, or ":memory:".
            busy_timeout_seconds: How long a write waits for another process's lock.
        """
        self.path = str(path)
        self.busy_timeout_seconds = busy_timeout_seconds
        self._db: aiosqlite.Connection | None = None
        self._clock: Clock = SystemClock()
        self._write_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError(f"store {self!r} is not open; call open() first")
        return self._db

    async def open(self, clock: Clock) -> None:
        """Open the file (creating it and its folder's tables) in WAL mode."""
        self._clock = clock
        if self._db is not None:
            return
        if self.path != ":memory:":
            parent = await asyncio.to_thread(_parent_dir, self.path)
            if parent is None:
                raise StoreError(
                    f"cannot open SQLite store {self.path!r}: folder of the file "
                    "does not exist; create it or choose another db_path"
                )
        db = None
        try:
            connecting = aiosqlite.connect(
                self.path, timeout=self.busy_timeout_seconds, isolation_level=None
            )
            _daemonize(connecting)
            db = await connecting
            db.row_factory = aiosqlite.Row
            await db.execute(
                f"PRAGMA busy_timeout = {int(self.busy_timeout_seconds * 1000)}"
            )
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            await db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            if db is not None:
                await db.close()
            raise StoreError(
                f"cannot open SQLite store {self.path!r}: {exc}; check that the "
                "file and its folder are writable"
            ) from exc
        self._db = db

    async def close(self) -> None:
        """Close the connection and its thread."""
        db, self._db = self._db, None
        if db is not None:
            await db.close()
            # close() returns before the connection's thread has ended; wait for
            # it, so the thread count is back to where it was once close returns.
            thread = getattr(db, "_thread", None)
            if isinstance(thread, threading.Thread) and thread.is_alive():
                await asyncio.to_thread(thread.join, 5.0)

    async def ping(self) -> None:
        """Run a write-lock check so a read-only or locked file shows up."""
        try:
            async with self._write_lock:
                await self.db.execute("BEGIN IMMEDIATE")
                await self.db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise StoreError(
                f"SQLite store {self.path!r} is not writable: {exc}"
            ) from exc

    async def _fetch(
        self, sql: str, args: Collection[Any] = ()
    ) -> builtins.list[sqlite3.Row]:
        # One connection carries every statement, so a statement must never run
        # inside another coroutine's open transaction: all of them take the lock.
        try:
            async with self._write_lock, self.db.execute(sql, tuple(args)) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path!r} failed: {exc}") from exc

    async def create(
        self, job: Job, *, idempotency_expires_at: datetime | None = None
    ) -> tuple[Job, bool]:
        """Insert the job, or return the live job that holds its idempotency key."""
        now = to_epoch(self._clock.now())
        values = [encode_field(c, getattr(job, c)) for c in _COLUMNS]
        insert = (
            "INSERT INTO jobs ("
            + ", ".join([*_COLUMNS, "idempotency_expires_at"])
            + ") VALUES ("
            + ", ".join("?" * (len(_COLUMNS) + 1))
            + ") RETURNING seq, "
            + ", ".join(_COLUMNS)
        )
        args = [*values, to_epoch(idempotency_expires_at)]
        async with self._write_lock:
            try:
                await self.db.execute("BEGIN IMMEDIATE")
                try:
                    if job.idempotency_key is not None:
                        await self.db.execute(
                            "UPDATE jobs SET idempotency_key = NULL WHERE "
                            "idempotency_key = ? AND idempotency_expires_at < ?",
                            (job.idempotency_key, now),
                        )
                    try:
                        async with self.db.execute(insert, args) as cursor:
                            row = await cursor.fetchone()
                        created = True
                    except sqlite3.IntegrityError:
                        async with self.db.execute(
                            _SELECT + " WHERE idempotency_key = ?",
                            (job.idempotency_key,),
                        ) as cursor:
                            row = await cursor.fetchone()
                        created = False
                    await self.db.execute("COMMIT")
                except BaseException:
                    await self.db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite store {self.path!r} failed: {exc}") from exc
        if row is None:
            raise StoreError(f"job {job.id!r} could not be stored in {self.path!r}")
        return decode_row(dict(row)), created

    async def get(self, job_id: str) -> Job | None:
        """Return the job, or None."""
        rows = await self._fetch(_SELECT + " WHERE id = ?", (job_id,))
        return decode_row(dict(rows[0])) if rows else None

    async def list(
        self,
        *,
        status: JobStatus | None = None,
        task: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobPage:
        """Return a page of jobs, newest first, keyed on the insertion sequence."""
        where: list[str] = []
        args: list[Any] = []
        if status is not None:
            where.append("status = ?")
            args.append(str(status))
        if task is not None:
            where.append("task = ?")
            args.append(task)
        if cursor is not None:
            try:
                before = int(cursor)
            except ValueError:
                raise ValueError(
                    f"cursor {cursor!r} is not valid; pass the next_cursor of a page"
                ) from None
            where.append("seq < ?")
            args.append(before)
        sql = _SELECT
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit + 1)
        rows = await self._fetch(sql, args)
        items = [decode_row(dict(r)) for r in rows[:limit]]
        next_cursor = str(rows[limit - 1]["seq"]) if len(rows) > limit else None
        return JobPage(items=items, next_cursor=next_cursor)

    async def update(
        self,
        job_id: str,
        fields: Mapping[str, Any],
        *,
        expect_status: Collection[JobStatus] | None = None,
        expect_attempt: int | None = None,
        expect_worker: str | None = None,
        expect_cancel_requested: bool | None = None,
    ) -> Job | None:
        """Compare-and-set the named fields in one UPDATE ... RETURNING."""
        sets: list[str] = []
        args: list[Any] = []
        for name, value in fields.items():
            if name == APPEND_ERROR:
                sets.append("errors = json_insert(errors, '$[#]', json(?))")
            elif name in _COLUMN_SET:
                sets.append(f"{name} = ?")
            else:
                raise ValueError(f"{name!r} is not a job field that can be updated")
            args.append(encode_field(name, value))
        if "updated_at" not in fields:
            sets.append("updated_at = ?")
            args.append(to_epoch(self._clock.now()))
        where = ["id = ?"]
        args.append(job_id)
        if expect_status is not None:
            statuses = [str(s) for s in expect_status]
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args.extend(statuses)
        if expect_attempt is not None:
            where.append("attempt = ?")
            args.append(expect_attempt)
        if expect_worker is not None:
            where.append("worker_id = ?")
            args.append(expect_worker)
        if expect_cancel_requested is not None:
            where.append("cancel_requested = ?")
            args.append(int(expect_cancel_requested))
        sql = (
            f"UPDATE jobs SET {', '.join(sets)} WHERE {' AND '.join(where)} "
            f"RETURNING seq, {', '.join(_COLUMNS)}"
        )
        rows = await self._fetch(sql, args)
        return decode_row(dict(rows[0])) if rows else None

    async def find_expired(
        self, now: datetime, *, limit: int = 100
    ) -> builtins.list[Job]:
        """Return running jobs whose lease ran out."""
        rows = await self._fetch(
            _SELECT + " WHERE status = 'running' AND lease_expires_at < ? "
            "ORDER BY lease_expires_at LIMIT ?",
            (to_epoch(now), limit),
        )
        return [decode_row(dict(r)) for r in rows]

    async def find_queued(
        self, *, updated_before: datetime | None = None, limit: int = 1000
    ) -> builtins.list[Job]:
        """Return queued jobs, oldest first."""
        if updated_before is None:
            sql = _SELECT + " WHERE status = 'queued' ORDER BY seq LIMIT ?"
            args: tuple[Any, ...] = (limit,)
        else:
            sql = (
                _SELECT + " WHERE status = 'queued' AND updated_at < ? "
                "ORDER BY updated_at LIMIT ?"
            )
            args = (to_epoch(updated_before), limit)
        return [decode_row(dict(r)) for r in await self._fetch(sql, args)]

    async def count_by_status(self) -> dict[JobStatus, int]:
        """Return counts per status (every status present, zero included)."""
        rows = await self._fetch("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        counts = {s: 0 for s in JobStatus}
        for status, count in rows:
            counts[JobStatus(status)] = count
        return counts


_COLUMN_SET = frozenset(_COLUMNS) - {"id"}


def _daemonize(connection: aiosqlite.Connection) -> None:
    """Make the connection's thread a daemon before it starts.

    From aiosqlite 0.22 the thread is not a daemon, so a store that is never
    closed (a JobManager dropped without close()) would keep Python from exiting.
    """
    thread = getattr(connection, "_thread", None)
    if isinstance(thread, threading.Thread) and not thread.is_alive():
        thread.daemon = True


@hookimpl
def backgrounder_create_store(url: str) -> JobStore | None:
    """Build a SqliteStore for ``sqlite://`` URLs."""
    if not url.startswith("sqlite:"):
        return None
    return SqliteStore(path_from_url(url))
