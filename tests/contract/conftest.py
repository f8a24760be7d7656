"""Fixtures that give every contract test each JobStore and JobQueue in turn.

Backends: SQLite + memory (the embedded default), fakeredis (always), and the real
Redis server named by BACKGROUNDER_REDIS_URL (skipped, with the reason, when the
variable is not set). Real-server tests use a unique key prefix and delete their
keys afterwards.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import fakeredis
import pytest
import redis.asyncio as aioredis

from backgrounder.queue.base import JobQueue
from backgrounder.queue.memory import MemoryQueue
from backgrounder.store.base import JobStore
from backgrounder.store.sqlite import SqliteStore
from backgrounder_redis import RedisQueue, RedisStore
from backgrounder_testing import FakeClock

REDIS_URL = os.environ.get("BACKGROUNDER_REDIS_URL")
NO_REDIS = "BACKGROUNDER_REDIS_URL is not set; the real-Redis variant needs a server"

BACKENDS = [
    pytest.param("local", id="sqlite-memory"),
    pytest.param("fakeredis", id="fakeredis", marks=pytest.mark.redis),
    pytest.param(
        "redis",
        id="redis",
        marks=[pytest.mark.redis, pytest.mark.skipif(not REDIS_URL, reason=NO_REDIS)],
    ),
]


async def delete_prefix(client: aioredis.Redis, prefix: str) -> None:
    """Delete every key under ``prefix``."""
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=500)]
    if keys:
        await client.delete(*keys)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Which backend this run of the test uses."""
    return str(request.param)


@pytest.fixture
async def fake_server() -> fakeredis.FakeServer:
    """A fresh fakeredis server (Lua runs through lupa)."""
    return fakeredis.FakeServer()


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A unique key prefix; its keys on the real server are deleted afterwards."""
    prefix = f"bgtest:{uuid.uuid4().hex[:12]}"
    yield prefix
    if REDIS_URL:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            await delete_prefix(client, prefix)
        finally:
            await client.aclose()


def _make_store(
    backend: str, tmp_path: Path, server: fakeredis.FakeServer, prefix: str
) -> JobStore:
    if backend == "local":
        return SqliteStore(tmp_path / "jobs.db")
    if backend == "fakeredis":
        client = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
        return RedisStore("redis://fake/0", prefix=prefix, client=client)
    assert REDIS_URL
    return RedisStore(REDIS_URL, prefix=prefix)


def _make_queue(backend: str, server: fakeredis.FakeServer, prefix: str) -> JobQueue:
    if backend == "local":
        return MemoryQueue()
    if backend == "fakeredis":
        client = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
        return RedisQueue("redis://fake/0", prefix=prefix, client=client)
    assert REDIS_URL
    return RedisQueue(REDIS_URL, prefix=prefix)


@pytest.fixture
async def store(
    backend: str,
    tmp_path: Path,
    fake_server: fakeredis.FakeServer,
    redis_prefix: str,
    clock: FakeClock,
) -> AsyncIterator[JobStore]:
    """An open JobStore of the backend under test, on the fake clock."""
    built = _make_store(backend, tmp_path, fake_server, redis_prefix)
    await built.open(clock)
    yield built
    await built.close()


@pytest.fixture
async def queue(
    backend: str,
    fake_server: fakeredis.FakeServer,
    redis_prefix: str,
    clock: FakeClock,
) -> AsyncIterator[JobQueue]:
    """An open JobQueue of the backend under test, on the fake clock."""
    built = _make_queue(backend, fake_server, redis_prefix)
    await built.open(clock)
    yield built
    await built.close()


@pytest.fixture
def backends(
    backend: str,
    tmp_path: Path,
    fake_server: fakeredis.FakeServer,
    redis_prefix: str,
) -> tuple[JobStore, JobQueue]:
    """An unopened store and queue of the backend (for a JobManager to open)."""
    return (
        _make_store(backend, tmp_path, fake_server, redis_prefix),
        _make_queue(backend, fake_server, redis_prefix),
    )


async def damage(store: JobStore, job_id: str) -> None:
    """Write a value of the wrong kind into a stored job, as a hand edit would."""
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as conn:
            conn.execute("UPDATE jobs SET priority = 'high' WHERE id = ?", (job_id,))
        conn.close()
    else:
        assert isinstance(store, RedisStore)
        await store.client.hset(f"{store.prefix}:job:{job_id}", "priority", "high")
