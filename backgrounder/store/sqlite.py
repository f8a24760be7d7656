"""The SQLite job store (aiosqlite), the embedded default; a built-in plugin."""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
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
    Update,
    decode_values,
    encode_field,
    read_job,
    read_jobs,
    refuse_missing_required,
    to_epoch,
)

__all__ = ["SqliteStore", "path_from_url"]

logger = logging.getLogger(__name__)

#: Every Job field has a column of its name, in the model's order.
_COLUMNS = list(Job.model_fields)
_RETURNING = "seq, " + ", ".join(_COLUMNS)
_SELECT = f"SELECT {_RETURNING} FROM jobs"
_INSERT = (
    f"INSERT INTO jobs ({', '.join([*_COLUMNS, 'idempotency_expires_at'])}) "
    f"VALUES ({', '.join('?' * (len(_COLUMNS) + 1))})"
)

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
CREATE TABLE IF NOT EXISTS _health (id INTEGER PRIMARY KEY, checks INTEGER);
INSERT OR IGNORE INTO _health (id, checks) VALUES (1, 0);
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


Row = tuple[Any, ...]
Op = Callable[[sqlite3.Connection], Any]

#: Rows changed between two background checkpoints (about SQLite's own
#: 1,000-page default, at a few pages a row).
_CHECKPOINT_CHANGES = 100
#: WAL pages after which a writer checkpoints by itself: only reached when the
#: background checkpoint cannot keep up (about 40 MB at 4 KiB pages).
_WRITER_CHECKPOINT_PAGES = 1000


def _run_batch(
    conn: sqlite3.Connection, ops: builtins.list[Op]
) -> tuple[builtins.list[Any], int]:
    """Run ``ops`` in one write transaction; one op's failure spares the others.

    Returns the ops' results and the connection's count of changed rows so far.

    Runs in the connection's thread. The ops run one after the other in one
    transaction; if one raises, the transaction is rolled back and the batch
    runs again with a savepoint around each op, so the failing op is undone
    alone and its exception is returned in its place. Ops only read and write
    through ``conn``, so running them again after the rollback is safe; the
    savepoints cost two statements per op, which the usual batch is spared.
    """
    try:
        return _run_ops(conn, ops, savepoints=False), conn.total_changes
    except sqlite3.Error as exc:
        if len(ops) == 1:
            return [exc], conn.total_changes
    return _run_ops(conn, ops, savepoints=True), conn.total_changes


def _run_ops(
    conn: sqlite3.Connection, ops: builtins.list[Op], *, savepoints: bool
) -> builtins.list[Any]:
    """Run ``ops`` in one transaction, committed unless one raises.

    Without savepoints an op's sqlite3.Error rolls everything back and is
    raised; with them it is undone alone and returned in the op's place.
    """
    results: builtins.list[Any] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for op in ops:
            if not savepoints:
                results.append(op(conn))
                continue
            conn.execute("SAVEPOINT op")
            try:
                results.append(op(conn))
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK TO op")
                results.append(exc)
            conn.execute("RELEASE op")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results


class SqliteStore(JobStore):
    """Jobs in one SQLite file, in WAL mode, shared safely by several processes.

    Statements run on aiosqlite's connection thread. Calls made while a batch is
    in flight are grouped into the next batch, which runs as one write
    transaction (``BEGIN IMMEDIATE``, so SQLite's busy timeout applies and no
    read-then-write can fail with "database is locked" at once) and one commit:
    many concurrent writers cost one thread hop and one commit between them.
    Every update is one statement whose WHERE clause is the compare-and-set.

    Checkpoints (copying the write-ahead log back into the file) run on a
    connection and thread of their own, every few hundred changed rows, so no
    commit waits for one; a writer checkpoints by itself only if the log grows
    far beyond that.
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
        self._pending: builtins.list[tuple[Op, asyncio.Future[Any]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._checkpointer: aiosqlite.Connection | None = None
        self._checkpoint: asyncio.Task[None] | None = None
        self._changes_at_checkpoint = 0

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    async def open(self, clock: Clock) -> None:
        """Open the file (creating its tables) in WAL mode.

        Raises:
            StoreError: The folder does not exist, or the file cannot be opened.
        """
        self._clock = clock
        if self._db is not None:
            return
        if self.path != ":memory:":
            parent = await asyncio.to_thread(_parent_dir, self.path)
            if parent is None:
                raise StoreError(
                    f"cannot open SQLite store {self.path!r}: the folder of the "
                    "file does not exist; create it or choose another db_path"
                )
        db = None
        try:
            connecting = aiosqlite.connect(
                self.path, timeout=self.busy_timeout_seconds, isolation_level=None
            )
            _daemonize(connecting)
            db = await connecting
            if not callable(getattr(db, "_execute", None)):
                raise StoreError(
                    f"the installed aiosqlite {aiosqlite.__version__} lacks the "
                    "call the store batches statements through; install aiosqlite "
                    ">=0.20,<1"
                )
            timeout_ms = int(self.busy_timeout_seconds * 1000)
            await db.execute(f"PRAGMA busy_timeout = {timeout_ms}")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            await db.execute(f"PRAGMA wal_autocheckpoint = {_WRITER_CHECKPOINT_PAGES}")
            await db.executescript(_SCHEMA)
            if self.path != ":memory:":
                checkpointer = aiosqlite.connect(
                    self.path, timeout=self.busy_timeout_seconds, isolation_level=None
                )
                _daemonize(checkpointer)
                self._checkpointer = await checkpointer
        except (sqlite3.Error, OSError) as exc:
            await self._close_checkpointer()
            if db is not None:
                await db.close()
            raise StoreError(
                f"cannot open SQLite store {self.path!r}: {exc}; check that the "
                "file and its folder are writable"
            ) from exc
        except BaseException:
            await self._close_checkpointer()
            if db is not None:
                await db.close()
            raise
        self._db = db

    async def close(self) -> None:
        """Finish pending statements, then close the connection and its thread."""
        if self._drainer is not None:
            await asyncio.gather(self._drainer, return_exceptions=True)
        await self._close_checkpointer()
        db, self._db = self._db, None
        if db is not None:
            await _close_connection(db)

    async def _close_checkpointer(self) -> None:
        """Finish a running checkpoint and close its connection."""
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            await _close_connection(checkpointer)

    def _after_batch(self, total_changes: int) -> None:
        """Start a background checkpoint once enough rows changed since the last."""
        if (
            self._checkpointer is None
            or self._checkpoint is not None
            or total_changes - self._changes_at_checkpoint < _CHECKPOINT_CHANGES
        ):
            return
        self._changes_at_checkpoint = total_changes
        self._checkpoint = asyncio.create_task(self._run_checkpoint())

    async def _run_checkpoint(self) -> None:
        """Copy what the log holds into the file, waiting for no reader or writer.

        A passive checkpoint never holds up a writer, but under writes that never
        pause it cannot finish either, so the log is never started over and grows;
        SQLite's own checkpoint in the writer can then lose its turn to this one.
        When the log has reached the writer's threshold anyway, a RESTART
        checkpoint follows: writers wait (their busy timeout) while the few
        frames still left are copied, and the next write starts the log over.
        """
        try:
            checkpointer = self._checkpointer
            if checkpointer is not None:
                async with checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)") as c:
                    row = await c.fetchone()
                if row is not None and row[1] >= _WRITER_CHECKPOINT_PAGES:
                    await checkpointer.execute("PRAGMA wal_checkpoint(RESTART)")
        except sqlite3.Error as exc:
            # Harmless: the next one (or, far later, a writer) catches up.
            logger.debug("checkpoint of %s skipped: %s", self.path, exc)
        finally:
            self._checkpoint = None

    async def _run(self, op: Op) -> Any:
        """Run ``op(conn)`` in the next batch and return its result."""
        if self._db is None:
            raise StoreError(f"store {self!r} is not open; call open() first")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain())
        result = await future
        if isinstance(result, sqlite3.Error):
            raise StoreError(f"SQLite store {self.path!r} failed: {result}") from result
        return result

    async def _drain(self) -> None:
        """Run pending ops in batches until none are left."""
        try:
            while self._pending and self._db is not None:
                batch, self._pending = self._pending, []
                ops = [op for op, _ in batch]
                try:
                    results, changes = await self._db._execute(  # type: ignore[no-untyped-call]
                        _run_batch, self._db._conn, ops
                    )
                except BaseException as exc:
                    error = StoreError(f"SQLite store {self.path!r} failed: {exc}")
                    error.__cause__ = exc
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
                self._after_batch(changes)
        finally:
            self._drainer = None
            for _, future in self._pending if self._db is None else ():
                if not future.done():
                    future.set_exception(StoreError(f"store {self!r} was closed"))

    async def ping(self) -> None:
        """Take the write lock once, so a read-only or locked file shows up.

        Raises:
            StoreError: The file is not writable (read-only, locked, disk full).
        """
        if self.path != ":memory:" and not await asyncio.to_thread(
            os.path.exists, self.path
        ):
            raise StoreError(
                f"SQLite store {self.path!r} is gone: the file was deleted while "
                "open, and writes would be lost; restore it and restart"
            )
        try:
            # A real write (to the WAL), so an immutable or full file shows up.
            await self._run(
                lambda conn: conn.execute(
                    "UPDATE _health SET checks = checks + 1 WHERE id = 1"
                )
            )
        except StoreError as exc:
            raise StoreError(
                f"SQLite store {self.path!r} is not writable: {exc.__cause__ or exc}"
            ) from exc

    async def create(
        self, job: Job, *, idempotency_expires_at: datetime | None = None
    ) -> tuple[Job, bool]:
        """Insert the job, or return the live job that holds its idempotency key."""
        now = to_epoch(self._clock.now())
        args = [
            *(encode_field(c, getattr(job, c)) for c in _COLUMNS),
            to_epoch(idempotency_expires_at),
        ]
        key = job.idempotency_key

        def op(conn: sqlite3.Connection) -> tuple[Row | None, bool]:
            if key is not None:
                conn.execute(
                    "UPDATE jobs SET idempotency_key = NULL WHERE "
                    "idempotency_key = ? AND idempotency_expires_at < ?",
                    (key, now),
                )
                existing = conn.execute(
                    _SELECT + " WHERE idempotency_key = ?", (key,)
                ).fetchone()
                if existing is not None:
                    return existing, False
            try:
                conn.execute(_INSERT, args)
                return None, True
            except sqlite3.IntegrityError:
                # The unique index is the guarantee; the look-up above only
                # spares the failed insert in the usual case.
                if key is None:
                    raise
                return conn.execute(
                    _SELECT + " WHERE idempotency_key = ?", (key,)
                ).fetchone(), False

        row, created = await self._run(op)
        if created:
            # Stored as given: every column is the job's own field.
            return job, True
        if row is None:  # pragma: no cover - the key's row vanished mid-transaction
            raise StoreError(f"job {job.id!r} could not be stored in {self.path!r}")
        return self._read(row), False

    async def get(self, job_id: str) -> Job | None:
        """Return the job, or None."""
        rows = await self._fetch(_SELECT + " WHERE id = ?", (job_id,))
        return self._read(rows[0]) if rows else None

    async def get_many(self, job_ids: Sequence[str]) -> builtins.list[Job | None]:
        """Return the jobs in the order of ``job_ids``, in one statement."""
        ids = builtins.list(job_ids)
        if not ids:
            return []
        found: dict[str, Job] = {}
        for first in range(0, len(ids), 500):
            chunk = ids[first : first + 500]
            rows = await self._fetch(
                _SELECT + f" WHERE id IN ({', '.join('?' * len(chunk))})", chunk
            )
            for job in self._read_all(rows):
                if job is not None:
                    found[job.id] = job
        return [found.get(job_id) for job_id in ids]

    def _read(self, row: Row) -> Job:
        """Decode one row; CorruptJobError if it cannot be read."""
        return read_job(_decode, row, row[1], f"SQLite store {self.path!r}")

    def _read_all(self, rows: Sequence[Row]) -> builtins.list[Job | None]:
        """Decode rows; one that cannot be read is logged and gives None."""
        return read_jobs(
            _decode, ((row[1], row) for row in rows), f"SQLite store {self.path!r}"
        )

    async def _fetch(self, sql: str, args: Collection[Any] = ()) -> builtins.list[Row]:
        values = tuple(args)
        result: builtins.list[Row] = await self._run(
            lambda conn: conn.execute(sql, values).fetchall()
        )
        return result

    async def list(
        self,
        *,
        status: JobStatus | None = None,
        task: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobPage:
        """Return a page of jobs, newest first, keyed on the insertion sequence."""
        where: builtins.list[str] = []
        args: builtins.list[Any] = []
        if status is not None:
            where.append("status = ?")
            args.append(str(status))
        if task is not None:
            where.append("task = ?")
            args.append(task)
        if cursor is not None:
            try:
                before = int(cursor)
                if not 0 < before < 2**63:
                    raise ValueError(cursor)
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
        items = [job for job in self._read_all(rows[:limit]) if job is not None]
        next_cursor = str(rows[limit - 1][0]) if len(rows) > limit else None
        return JobPage(items=items, next_cursor=next_cursor)

    async def update(
        self, job_id: str, fields: Mapping[str, Any], **expect: Any
    ) -> Job | None:
        """Compare-and-set the named fields in one UPDATE ... RETURNING.

        ``expect`` takes the conditions ``JobStore.update`` documents.
        """
        sql, args = self._update_sql(Update(job_id, fields, **expect))
        rows = await self._fetch(sql, args)
        return self._read(rows[0]) if rows else None

    async def apply(self, update: Update) -> bool:
        """Compare-and-set in one UPDATE, without reading the row back."""
        sql, args = self._update_sql(update, returning=False)
        changed: int = await self._run(lambda conn: conn.execute(sql, args).rowcount)
        return changed > 0

    async def update_many(self, updates: Sequence[Update]) -> builtins.list[Job | None]:
        """Run every compare-and-set in one transaction, each on its own."""
        statements = [self._update_sql(u) for u in updates]
        if not statements:
            return []

        def op(conn: sqlite3.Connection) -> builtins.list[Row | None]:
            return [conn.execute(sql, args).fetchone() for sql, args in statements]

        rows: builtins.list[Row | None] = await self._run(op)
        return [None if row is None else self._read(row) for row in rows]

    def _update_sql(
        self, u: Update, *, returning: bool = True
    ) -> tuple[str, builtins.list[Any]]:
        fields = u.fields
        refuse_missing_required(fields)
        statuses = (
            None if u.expect_status is None else tuple(str(s) for s in u.expect_status)
        )
        shape = (
            tuple(fields),
            statuses,
            u.expect_attempt is not None,
            u.expect_worker is not None,
            u.expect_cancel_requested is not None,
            returning,
        )
        sql = _UPDATE_SQL.get(shape)
        if sql is None:
            sql = _UPDATE_SQL[shape] = _build_update_sql(*shape)
        args = [encode_field(name, value) for name, value in fields.items()]
        if "updated_at" not in fields:
            args.append(to_epoch(self._clock.now()))
        args.append(u.job_id)
        if statuses is not None:
            args.extend(statuses)
        if u.expect_attempt is not None:
            args.append(u.expect_attempt)
        if u.expect_worker is not None:
            args.append(u.expect_worker)
        if u.expect_cancel_requested is not None:
            args.append(int(u.expect_cancel_requested))
        return sql, args

    async def find_expired(
        self, now: datetime, *, limit: int = 100
    ) -> builtins.list[Job]:
        """Return running jobs whose lease ran out."""
        rows = await self._fetch(
            _SELECT + " WHERE status = 'running' AND lease_expires_at < ? "
            "ORDER BY lease_expires_at LIMIT ?",
            (to_epoch(now), limit),
        )
        return [job for job in self._read_all(rows) if job is not None]

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
        rows = await self._fetch(sql, args)
        return [job for job in self._read_all(rows) if job is not None]

    async def count_by_status(self) -> dict[JobStatus, int]:
        """Return counts per status (every status present, zero included)."""
        rows = await self._fetch("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        counts = {s: 0 for s in JobStatus}
        for status, count in rows:
            counts[JobStatus(status)] = count
        return counts


def _decode(row: Row) -> Job:
    """Build a Job from a row of ``seq`` followed by ``_COLUMNS``."""
    return decode_values(row[1:])


_COLUMN_SET = frozenset(_COLUMNS) - {"id"}

#: UPDATE statements by shape (fields named, statuses, which checks), built once.
_UPDATE_SQL: dict[tuple[Any, ...], str] = {}


def _build_update_sql(
    names: tuple[str, ...],
    statuses: tuple[str, ...] | None,
    attempt: bool,
    worker: bool,
    cancel_requested: bool,
    returning: bool,
) -> str:
    """Return the compare-and-set UPDATE for one shape of ``Update``.

    Raises:
        ValueError: A name is not a job field that can be updated.
    """
    sets: builtins.list[str] = []
    for name in names:
        if name == APPEND_ERROR:
            sets.append("errors = json_insert(errors, '$[#]', json(?))")
        elif name in _COLUMN_SET:
            sets.append(f"{name} = ?")
        else:
            raise ValueError(f"{name!r} is not a job field that can be updated")
    if "updated_at" not in names:
        sets.append("updated_at = ?")
    where = ["id = ?"]
    if statuses is not None:
        where.append(f"status IN ({', '.join('?' * len(statuses))})")
    if attempt:
        where.append("attempt = ?")
    if worker:
        where.append("worker_id = ?")
    if cancel_requested:
        where.append("cancel_requested = ?")
    sql = f"UPDATE jobs SET {', '.join(sets)} WHERE {' AND '.join(where)}"
    return f"{sql} RETURNING {_RETURNING}" if returning else sql


async def _close_connection(connection: aiosqlite.Connection) -> None:
    """Close ``connection`` and wait for its thread to end.

    aiosqlite's close() returns before the thread has ended; waiting for it puts
    the thread count back where it was once the store's close returns.
    """
    await connection.close()
    thread = getattr(connection, "_thread", None)
    if isinstance(thread, threading.Thread) and thread.is_alive():
        await asyncio.to_thread(thread.join, 5.0)


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
