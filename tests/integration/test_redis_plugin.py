"""The Redis plugin: URLs, error translation, waiting, and outages on fakeredis."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import fakeredis
import pytest
import redis.exceptions as rexc

from backgrounder import JobManager, NoopRunner, TaskRegistry
from backgrounder.clock import SystemClock
from backgrounder.errors import (
    ConfigurationError,
    CorruptJobError,
    QueueError,
    StoreError,
)
from backgrounder.models import Job
from backgrounder_redis import RedisQueue, RedisSettings, RedisStore
from backgrounder_redis._common import translate_errors
from tests.conftest import wait_for

pytestmark = pytest.mark.redis


def now() -> datetime:
    return datetime.now(UTC)


def fake_client(server: fakeredis.FakeServer) -> Any:
    return fakeredis.FakeAsyncRedis(server=server, decode_responses=True)


def test_redis_urls_resolve_through_the_plugin_hooks() -> None:
    manager = JobManager(
        store="redis://127.0.0.1:6379/3?prefix=app",
        queue="rediss://:secret@cache.local:6380/2",
    )
    assert isinstance(manager.store, RedisStore)
    assert isinstance(manager.queue, RedisQueue)
    assert manager.store.prefix == "app"
    assert manager.store.url == "redis://127.0.0.1:6379/3"
    assert manager.queue.prefix == "backgrounder"
    assert "secret" not in repr(manager.queue)


def test_the_core_reexports_the_redis_classes() -> None:
    from backgrounder.queue.redis import RedisQueue as CoreQueue
    from backgrounder.queue.redis import RedisStore as CoreStore

    assert CoreQueue is RedisQueue and CoreStore is RedisStore


def test_an_empty_prefix_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="empty prefix"):
        RedisQueue("redis://127.0.0.1/0?prefix=")


def test_a_blocking_wait_must_be_shorter_than_the_socket_timeout() -> None:
    with pytest.raises(ConfigurationError, match="socket_timeout"):
        RedisSettings(socket_timeout=1, max_block_seconds=2)


async def test_the_prefix_keeps_two_deployments_apart() -> None:
    server = fakeredis.FakeServer()
    a = RedisQueue(prefix="a", client=fake_client(server))
    b = RedisQueue(prefix="b", client=fake_client(server))
    clock = SystemClock()
    await a.open(clock)
    await b.open(clock)
    await a.push("x", priority=50)
    assert await b.size() == 0 and await a.size() == 1


@pytest.mark.parametrize(
    ("field", "garbage"),
    [
        ("priority", '50,"status":"failed"'),
        ("priority", "true"),
        ("errors", '[],"priority":99'),
        ("cancel_requested", "false"),
        ("created_at", "null"),
    ],
)
async def test_a_hand_edited_hash_reads_as_an_error_not_as_another_job(
    field: str, garbage: str
) -> None:
    """A field edited by hand into something that is not its kind of value makes
    reading the job fail; it never leaks into another field."""
    server = fakeredis.FakeServer()
    client = fake_client(server)
    store = RedisStore(prefix="edit", client=fake_client(server))
    await store.open(SystemClock())
    job, _ = await store.create(
        Job(id="j1", task="t", created_at=now(), updated_at=now())
    )
    assert await store.get(job.id) == job
    await client.hset(f"edit:job:{job.id}", field, garbage)
    with pytest.raises(CorruptJobError, match="'j1'"):
        await store.get(job.id)


async def test_b32_read_only_reply_becomes_a_store_error_and_drops_connections() -> (
    None
):
    class Pool:
        disconnected = 0

        async def disconnect(self) -> None:
            Pool.disconnected += 1

    class Client:
        connection_pool = Pool()

    client: Any = Client()
    with pytest.raises(StoreError, match="read-only"):
        async with translate_errors(client, StoreError, "store", "redis://h/0"):
            raise rexc.ReadOnlyError("You can't write against a read only replica.")
    with pytest.raises(QueueError, match="read-only"):
        async with translate_errors(client, QueueError, "queue", "redis://h/0"):
            raise rexc.ResponseError("READONLY You can't write against a replica.")
    assert Pool.disconnected == 2


async def test_claim_waits_without_polling() -> None:
    queue = RedisQueue(
        client=fake_client(fakeredis.FakeServer()),
        settings=RedisSettings(max_block_seconds=2.0),
    )
    await queue.open(SystemClock())
    calls: list[str] = []
    claim, wait = queue._claim_now, queue._wait_then_claim

    async def counting(*args: Any) -> Any:
        calls.append("claim")
        return await claim(*args)

    async def counting_wait(*args: Any) -> Any:
        calls.append("wait, then claim")
        return await wait(*args)

    queue._claim_now = counting  # type: ignore[method-assign]
    queue._wait_then_claim = counting_wait  # type: ignore[method-assign]
    assert (
        await queue.claim(worker_id="w", lease_seconds=5, timeout_seconds=0.3) is None
    )
    # One look before the blocking wait and one behind it: no polling loop.
    assert calls == ["claim", "wait, then claim"]
    await queue.close()


async def test_an_interrupted_wait_loses_no_item() -> None:
    queue = RedisQueue(client=fake_client(fakeredis.FakeServer()))
    await queue.open(SystemClock())
    waiter = asyncio.create_task(
        queue.claim(worker_id="w", lease_seconds=5, timeout_seconds=30)
    )
    await asyncio.sleep(0.05)  # let it block; not a synchronisation
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await queue.push("x", priority=50)
    # The server may have run the canceled wait's claim: it gives the id back.
    async with asyncio.timeout(5):
        while await queue.in_flight():
            await asyncio.sleep(0.01)
    assert await queue.claim(worker_id="w", lease_seconds=5, timeout_seconds=0) == "x"
    await queue.close()


@pytest.fixture
async def outage() -> AsyncIterator[tuple[fakeredis.FakeServer, JobManager]]:
    server = fakeredis.FakeServer()
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0, stages=1))
    manager = JobManager(
        store=RedisStore(client=fake_client(server)),
        queue=RedisQueue(client=fake_client(server)),
        registry=registry,
        worker_count=2,
        poll_seconds=0.2,
    )
    await manager.start()
    yield server, manager
    server.connected = True
    await manager.close(drain=False)


async def test_b31_outage_gives_backend_errors_and_work_resumes(
    outage: tuple[fakeredis.FakeServer, JobManager], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="backgrounder.worker")
    server, manager = outage
    server.connected = False
    with pytest.raises(StoreError, match="unreachable"):
        await manager.submit("noop")
    report = await manager.health()
    assert not report["ok"]
    assert not report["store"]["ok"] and not report["queue"]["ok"]
    async with asyncio.timeout(10):
        while not any("cannot claim" in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.05)
    server.connected = True
    job = await manager.submit("noop")
    done = await wait_for(manager, job.id, "done", timeout=10)
    assert done.attempt == 1
    assert (await manager.health())["ok"]
