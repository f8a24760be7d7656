"""Store/queue pairs the reliability suites run against, and a read-only queue view.

Each backend is a ``Backend``: a name, a way to build a fresh store and queue in
a folder, and a way to read which ids the queue holds (waiting, and claimed but
not yet acknowledged) without changing it. The suites take the list
``BACKENDS`` as a pytest parameter, so a new pair is one more entry here.
"""

from __future__ import annotations

import importlib
import os
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from backgrounder.queue.base import JobQueue
from backgrounder.queue.memory import MemoryQueue
from backgrounder.store.base import JobStore
from backgrounder.store.sqlite import SqliteStore

__all__ = ["BACKENDS", "BACKEND_PARAMS", "Backend", "QueueView"]


@dataclass(frozen=True)
class QueueView:
    """What the queue holds, read without changing it.

    Attributes:
        waiting: Every id waiting to be claimed (ready or delayed), once per
            place it is held: a repeated id is a duplicate.
        claimed: Ids handed out by ``claim`` and not yet acknowledged.
        lost: Ids the queue lists as waiting but can never hand out.
    """

    waiting: list[str]
    claimed: list[str]
    lost: list[str]

    def duplicates(self) -> list[str]:
        """Return the ids held more than once, waiting or claimed."""
        counts = Counter([*self.waiting, *self.claimed])
        return sorted(job_id for job_id, n in counts.items() if n > 1)


@dataclass(frozen=True)
class Backend:
    """A store/queue pair for the suites.

    Attributes:
        name: The pytest id.
        make: Build a fresh, unopened store and queue under a folder.
        inspect: Read the queue's contents (read-only).
        cleanup: Remove what a run left on a shared server (after close).
    """

    name: str
    make: Callable[[Path], tuple[JobStore, JobQueue]]
    inspect: Callable[[JobQueue], Awaitable[QueueView]]
    cleanup: Callable[[JobStore, JobQueue], Awaitable[None]]

    @property
    def marks(self) -> list[pytest.MarkDecorator]:
        """pytest marks of the pair ("redis" for the Redis ones)."""
        return [pytest.mark.redis] if self.name.startswith("redis") else []

    def param(self) -> Any:
        """This backend as a pytest parameter, with its id and marks."""
        return pytest.param(self, id=self.name, marks=self.marks)

    def __repr__(self) -> str:
        return self.name


def _make_sqlite_memory(folder: Path) -> tuple[JobStore, JobQueue]:
    return SqliteStore(folder / f"jobs-{uuid.uuid4().hex[:8]}.db"), MemoryQueue()


async def _inspect_memory(queue: JobQueue) -> QueueView:
    """Read MemoryQueue internals: live heap entries and the claimed map.

    A heap entry is live when it carries the sequence number ``_entries`` holds
    for its id (a ready entry also needs a due time of 0, as ``claim`` checks).
    An id in ``_entries`` without a live heap entry could never be claimed, so
    it is reported as lost.
    """
    assert isinstance(queue, MemoryQueue)
    entries = queue._entries

    def live(job_id: str, seq: int, *, ready: bool) -> bool:
        entry = entries.get(job_id)
        return entry is not None and entry[2] == seq and (entry[0] == 0.0 or not ready)

    waiting = [j for _, seq, j in queue._ready if live(j, seq, ready=True)]
    waiting += [j for _, seq, j in queue._delayed if live(j, seq, ready=False)]
    lost = sorted(set(entries) - set(waiting))
    return QueueView(waiting=waiting, claimed=list(queue._claimed), lost=lost)


def _redis_classes() -> tuple[type[JobStore], type[JobQueue]] | None:
    """Return RedisStore and RedisQueue once the Redis plugin provides them."""
    try:
        module = importlib.import_module("backgrounder_redis")
    except ImportError:
        return None
    store_cls = getattr(module, "RedisStore", None)
    queue_cls = getattr(module, "RedisQueue", None)
    if store_cls is None or queue_cls is None:
        return None
    return store_cls, queue_cls


def _make_redis(url: str | None) -> Callable[[Path], tuple[JobStore, JobQueue]]:
    """Build a store and queue on a fresh key prefix: fakeredis, or the server."""

    def make(folder: Path) -> tuple[JobStore, JobQueue]:
        classes = _redis_classes()
        assert classes is not None
        store_cls, queue_cls = classes
        prefix = f"bgtest:{uuid.uuid4().hex[:12]}"
        if url is None:
            import fakeredis

            server = fakeredis.FakeServer()
            store_client = fakeredis.FakeAsyncRedis(
                server=server, decode_responses=True
            )
            queue_client = fakeredis.FakeAsyncRedis(
                server=server, decode_responses=True
            )
            return (
                store_cls("redis://fake/0", prefix=prefix, client=store_client),  # type: ignore[call-arg]
                queue_cls("redis://fake/0", prefix=prefix, client=queue_client),  # type: ignore[call-arg]
            )
        return (
            store_cls(url, prefix=prefix),  # type: ignore[call-arg]
            queue_cls(url, prefix=prefix),  # type: ignore[call-arg]
        )

    return make


async def _inspect_redis(queue: JobQueue) -> QueueView:
    """Read the RedisQueue's ready, delayed and in-flight sorted sets."""
    redis_queue: Any = queue
    client = redis_queue.client
    keys: list[str] = redis_queue.keys
    ready = await client.zrange(keys[0], 0, -1)
    delayed = await client.zrange(keys[1], 0, -1)
    inflight = await client.zrange(keys[2], 0, -1)
    return QueueView(waiting=[*ready, *delayed], claimed=list(inflight), lost=[])


async def _cleanup_redis(store: JobStore, queue: JobQueue) -> None:
    """Delete the keys of the run's prefix on the real server."""
    url = os.environ.get("BACKGROUNDER_REDIS_URL")
    if url is None:
        return
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        redis_store: Any = store
        prefix = redis_store.prefix
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


async def _no_cleanup(store: JobStore, queue: JobQueue) -> None:
    return None


def _backends() -> list[Backend]:
    backends = [
        Backend("sqlite-memory", _make_sqlite_memory, _inspect_memory, _no_cleanup),
    ]
    # The Redis pairs join once backgrounder_redis exports RedisStore and
    # RedisQueue: fakeredis always, the real server when BACKGROUNDER_REDIS_URL
    # names it. Both are marked "redis".
    if _redis_classes() is not None:
        backends.append(
            Backend("redis-fake", _make_redis(None), _inspect_redis, _cleanup_redis)
        )
        url = os.environ.get("BACKGROUNDER_REDIS_URL")
        if url:
            backends.append(
                Backend("redis", _make_redis(url), _inspect_redis, _cleanup_redis)
            )
    return backends


#: The pairs every reliability suite runs on (see ``_backends``).
BACKENDS: list[Backend] = _backends()

#: BACKENDS as pytest parameters (ids and marks set).
BACKEND_PARAMS = [backend.param() for backend in BACKENDS]
