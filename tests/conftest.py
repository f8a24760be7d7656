"""Shared fixtures of the project's own tests."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from backgrounder import JobManager, JobStatus, TaskRegistry
from backgrounder.models import Job
from backgrounder_testing import FakeClock

ManagerFactory = Callable[..., Awaitable[JobManager]]
BackendPair = Callable[[], dict[str, Any]]


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock for the test."""
    return FakeClock()


#: Store/queue pairs a test marked ``all_backends`` runs on: the embedded
#: default always, Redis+Redis on fakeredis always, and on the real server when
#: BACKGROUNDER_REDIS_URL names it.
MANAGER_BACKENDS = ["sqlite-memory", "redis-fake"] + (
    ["redis"] if os.environ.get("BACKGROUNDER_REDIS_URL") else []
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run tests marked ``all_backends`` once per store/queue pair."""
    if metafunc.definition.get_closest_marker("all_backends") is None:
        return
    if not {"make_manager", "backend_pair"} & set(metafunc.fixturenames):
        return
    metafunc.parametrize(
        "manager_backend",
        [
            pytest.param(
                name,
                id=name,
                marks=[pytest.mark.redis] if name.startswith("redis") else [],
            )
            for name in MANAGER_BACKENDS
        ],
    )


@pytest.fixture
def manager_backend() -> str:
    """The store/queue pair of ``make_manager`` (parametrized by all_backends)."""
    return "sqlite-memory"


class _RedisPairs:
    """Store/queue pairs that share one key prefix (and fake server), so several
    managers of a test see the same jobs, as several processes would."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.prefix = f"bgtest:{uuid.uuid4().hex[:12]}"
        self.server: Any = None
        if url is None:
            import fakeredis

            self.server = fakeredis.FakeServer()

    def make(self) -> tuple[Any, Any]:
        from backgrounder_redis import RedisQueue, RedisStore

        if self.url is None:
            import fakeredis

            clients = [
                fakeredis.FakeAsyncRedis(server=self.server, decode_responses=True)
                for _ in range(2)
            ]
            return (
                RedisStore("redis://fake/0", prefix=self.prefix, client=clients[0]),
                RedisQueue("redis://fake/0", prefix=self.prefix, client=clients[1]),
            )
        return (
            RedisStore(self.url, prefix=self.prefix),
            RedisQueue(self.url, prefix=self.prefix),
        )

    async def cleanup(self) -> None:
        if self.url is None:
            return
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.url)
        try:
            async for key in client.scan_iter(match=f"{self.prefix}:*", count=1000):
                await client.delete(key)
        finally:
            await client.aclose()


@pytest.fixture
async def _redis_pairs(manager_backend: str) -> AsyncIterator[_RedisPairs | None]:
    """The Redis pairs of a test on a Redis backend (None on the embedded one)."""
    if manager_backend == "sqlite-memory":
        yield None
        return
    url = os.environ.get("BACKGROUNDER_REDIS_URL")
    pairs = _RedisPairs(url if manager_backend == "redis" else None)
    yield pairs
    await pairs.cleanup()


@pytest.fixture
def backend_pair(_redis_pairs: _RedisPairs | None) -> BackendPair:
    """Return a maker of the ``store``/``queue`` options of the test's backend.

    For code that builds its own manager (``setup_backgrounder`` apps): on the
    embedded backend it returns ``{}`` (the caller's SQLite default applies), on
    a Redis one a fresh store and queue on the test's shared prefix. Tests marked
    ``all_backends`` run once per pair, as with ``make_manager``.
    """

    def make() -> dict[str, Any]:
        if _redis_pairs is None:
            return {}
        store, queue = _redis_pairs.make()
        return {"store": store, "queue": queue}

    return make


@pytest.fixture
async def make_manager(
    tmp_path: Path, _redis_pairs: _RedisPairs | None
) -> AsyncIterator[ManagerFactory]:
    """Return a factory of started JobManagers on a temp SQLite file.

    A test marked ``all_backends`` gets its managers on each store/queue pair in
    turn (``MANAGER_BACKENDS``); every manager of one test shares its store and
    queue, unless the test passes its own ``db_path``, ``store`` or ``queue``.
    """
    managers: list[JobManager] = []
    redis_pairs = _redis_pairs

    async def factory(registry: TaskRegistry, **options: Any) -> JobManager:
        own = {"db_path", "store", "queue"} & set(options)
        if redis_pairs is not None and not own:
            options["store"], options["queue"] = redis_pairs.make()
        options.setdefault("db_path", tmp_path / "jobs.db")
        if "store" in options:
            options.pop("db_path")
        manager = JobManager(registry=registry, **options)
        await manager.start()
        managers.append(manager)
        return manager

    yield factory
    for manager in reversed(managers):
        await manager.close(drain=False)


async def wait_for(
    manager: JobManager,
    job_id: str,
    *statuses: str,
    timeout: float = 10.0,
) -> Job:
    """Wait, through the job's event stream, until it reaches one of ``statuses``."""
    wanted = {JobStatus(s) for s in statuses} or {
        JobStatus.done,
        JobStatus.failed,
        JobStatus.canceled,
    }
    async with asyncio.timeout(timeout):
        while True:
            async for event in manager.events(job_id):
                if event.job.status in wanted:
                    return event.job
            job = await manager.get(job_id)
            if job.status in wanted:
                return job
            raise AssertionError(f"job {job_id} ended {job.status}, not {wanted}")
