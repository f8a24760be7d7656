"""The Redis backends' pipelined connection keeps each caller's reply its own.

Commands of many tasks share one connection and replies are matched to callers
by order, so a caller that goes away mid-flight must not shift the replies of
the others. Run on fakeredis and, when BACKGROUNDER_REDIS_URL is set, on the
real server (where the hiredis wire is used).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_exc

from backgrounder.errors import StoreError
from backgrounder.models import ErrorCode, ErrorInfo, Job, JobStatus
from backgrounder.store.base import APPEND_ERROR, Update
from backgrounder_redis import RedisQueue, RedisStore
from backgrounder_testing import FakeClock

pytestmark = pytest.mark.redis

REDIS_URL = os.environ.get("BACKGROUNDER_REDIS_URL")


SERVERS = [
    "fakeredis",
    pytest.param(
        "redis",
        marks=pytest.mark.skipif(
            not REDIS_URL, reason="BACKGROUNDER_REDIS_URL is not set"
        ),
    ),
]


async def _opened(
    kind: type[RedisStore] | type[RedisQueue], server: str, clock: FakeClock
) -> AsyncIterator[Any]:
    prefix = f"bgtest:{uuid.uuid4().hex[:12]}"
    if server == "fakeredis":
        client = fakeredis.FakeAsyncRedis(decode_responses=True)
        built = kind("redis://fake/0", prefix=prefix, client=client)
    else:
        assert REDIS_URL
        built = kind(REDIS_URL, prefix=prefix)
    await built.open(clock)
    yield built
    await built.close()
    if REDIS_URL and server == "redis":
        admin = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in admin.scan_iter(match=f"{prefix}:*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


@pytest.fixture(params=SERVERS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    async for built in _opened(RedisStore, request.param, FakeClock()):
        yield built


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=SERVERS)
async def queue(
    request: pytest.FixtureRequest, clock: FakeClock
) -> AsyncIterator[RedisQueue]:
    async for built in _opened(RedisQueue, request.param, clock):
        yield built


async def _waiting_claim(queue: RedisQueue) -> asyncio.Task[list[str]]:
    """Start a claim on the empty queue; return once its first claim found
    nothing and it goes to wait on the server."""
    waiting = asyncio.Event()
    real = queue._wait_then_claim

    async def spy(*args: Any) -> Any:
        waiting.set()
        return await real(*args)

    queue._wait_then_claim = spy  # type: ignore[method-assign]
    waiter = asyncio.create_task(
        queue.claim_many(worker_id="w", lease_seconds=30, timeout_seconds=60, limit=5)
    )
    async with asyncio.timeout(5):
        await waiting.wait()
    return waiter


async def test_a_claim_woken_by_a_push_holds_the_id_with_its_lease(
    queue: RedisQueue, clock: FakeClock
) -> None:
    """The claim that runs behind the wait records the id in flight, leased."""
    waiter = await _waiting_claim(queue)
    await queue.push("x", priority=50)
    async with asyncio.timeout(5):
        assert await waiter == ["x"]
    assert (await queue.size(), await queue.in_flight()) == (0, 1)
    clock.advance(29)
    assert await queue.recover_expired() == 0
    clock.advance(2)
    assert await queue.recover_expired() == 1
    assert await queue.claim_many(
        worker_id="w", lease_seconds=30, timeout_seconds=0, limit=5
    ) == ["x"]


async def test_a_waiting_claim_survives_the_server_forgetting_its_scripts(
    queue: RedisQueue,
) -> None:
    waiter = await _waiting_claim(queue)
    await queue.client.script_flush()
    await queue.push("x", priority=50)
    async with asyncio.timeout(5):
        assert await waiter == ["x"]
    assert await queue.in_flight() == 1


async def make_jobs(store: RedisStore, count: int) -> list[Job]:
    now = store._clock.now()
    jobs = []
    for i in range(count):
        job = Job(id=f"j{i}", task="t", params={"i": i}, created_at=now, updated_at=now)
        jobs.append((await store.create(job))[0])
    return jobs


@pytest.mark.parametrize("turns", [1, 2, 3], ids=["queued", "written", "later"])
async def test_cancelled_callers_leave_the_others_replies_in_order(
    store: RedisStore, turns: int
) -> None:
    jobs = await make_jobs(store, 20)
    tasks = [asyncio.create_task(store.get(job.id)) for job in jobs]
    for _ in range(turns):  # loop turns, not time: queued, then written, ...
        await asyncio.sleep(0)
    for task in tasks[::2]:
        task.cancel()
    results: list[Any] = await asyncio.gather(*tasks, return_exceptions=True)
    for job, result in list(zip(jobs, results, strict=True))[1::2]:
        assert isinstance(result, Job) and result.id == job.id
    assert all(isinstance(r, asyncio.CancelledError) for r in results[::2])
    # Later calls on the same connection still get their own replies.
    assert [j.id if j else None for j in await store.get_many(["j3", "x", "j0"])] == [
        "j3",
        None,
        "j0",
    ]


async def test_a_cancelled_batch_still_writes_and_keeps_order(
    store: RedisStore,
) -> None:
    jobs = await make_jobs(store, 5)
    batch = asyncio.create_task(
        store.update_many([Update(job.id, {"priority": 7}) for job in jobs])
    )
    await asyncio.sleep(0)
    batch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await batch
    after = await store.get_many([job.id for job in jobs])
    # The writes were sent before the cancel: each landed whole or not at all.
    assert {j.priority for j in after if j is not None} <= {7, jobs[0].priority}
    assert [j.id for j in after if j is not None] == [job.id for job in jobs]


async def test_scripts_are_loaded_again_after_the_server_forgets_them(
    store: RedisStore,
) -> None:
    (job,) = await make_jobs(store, 1)
    await store.client.script_flush()
    updated = await store.update(
        job.id, {"status": JobStatus.running}, expect_status={JobStatus.queued}
    )
    assert updated is not None and updated.status == JobStatus.running
    results = await store.update_many(
        [Update(job.id, {"priority": 3}), Update("none", {"priority": 3})]
    )
    assert results[0] is not None and results[0].priority == 3
    assert results[1] is None


async def test_a_batch_whose_reply_is_lost_is_not_sent_again() -> None:
    """The connection breaks after the server ran a write but before its reply:
    the caller gets a StoreError and the write ran once (no replay that would
    append the error twice, or make a compare-and-set report it missed).

    fakeredis takes the redis-py connection path (no hiredis wire), the one
    that used to send a failed batch a second time.
    """
    client = fakeredis.FakeAsyncRedis(decode_responses=True)
    store = RedisStore(
        "redis://fake/0", prefix=f"bgtest:{uuid.uuid4().hex[:12]}", client=client
    )
    await store.open(FakeClock())
    try:
        (job,) = await make_jobs(store, 1)
        assert store._wire is None and store._conn is not None
        conn = store._conn
        real_read = conn.read_response
        lost: list[Any] = []

        async def read_then_drop(*args: Any, **kwargs: Any) -> Any:
            reply = await real_read(*args, **kwargs)
            if not lost:
                lost.append(reply)
                raise redis_exc.ConnectionError("connection reset after the write")
            return reply

        conn.read_response = read_then_drop
        error = ErrorInfo(code=ErrorCode.execution_error, message="boom")
        with pytest.raises(StoreError, match="connection reset"):
            await store.update(job.id, {APPEND_ERROR: error})
        assert lost, "the write reached the server"
        stored = await store.get(job.id)
        assert stored is not None
        assert [e.message for e in stored.errors] == ["boom"]
    finally:
        await store.close()


async def _twin(queue: RedisQueue, clock: FakeClock) -> RedisQueue:
    """Return another open queue on the same keys, as another process has."""
    twin = RedisQueue(
        REDIS_URL or "redis://fake/0",
        prefix=queue.prefix,
        client=None if queue._own_client else queue.client,
    )
    await twin.open(clock)
    return twin


async def _close_and_look(queue: RedisQueue, clock: FakeClock) -> RedisQueue:
    """Close ``queue`` and return another, open view of the same keys (as another
    process would see them after this one stopped)."""
    twin = await _twin(queue, clock)
    await queue.close()  # lets claims of canceled callers finish and give back
    return twin


async def test_a_canceled_wait_gives_back_what_its_claim_took(
    queue: RedisQueue, clock: FakeClock
) -> None:
    """The server runs the claim behind a wait even when its caller is gone:
    whatever it took is ready again, not held for a claim lease."""
    waiter = await _waiting_claim(queue)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await queue.push("x", priority=70)
    twin = await _close_and_look(queue, clock)
    try:
        assert (await twin.size(), await twin.in_flight()) == (1, 0)
        await twin.push("y", priority=50)
        assert await twin.claim_many(
            worker_id="w", lease_seconds=30, timeout_seconds=0, limit=5
        ) == ["x", "y"]
    finally:
        await twin.close()


@pytest.mark.parametrize("turns", range(6))
async def test_a_claim_canceled_as_a_push_wakes_it_loses_nothing(
    queue: RedisQueue, clock: FakeClock, turns: int
) -> None:
    """Whichever loop turn the cancel lands in, even the one in which the claim
    comes back with the id, the id ends either with the caller or ready."""
    taken: list[str] = []
    ready: list[str] = []
    for round in range(5):
        claimer = await _twin(queue, clock)  # a worker process, stopped below
        waiter = await _waiting_claim(claimer)
        await queue.push(f"x{round}", priority=50)
        for _ in range(turns):
            await asyncio.sleep(0)  # moves the cancel through the loop's turns
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            taken += await waiter
        await claimer.close()
        back = await queue.claim_many(
            worker_id="w", lease_seconds=30, timeout_seconds=0, limit=5
        )
        await queue.ack_many(back)
        ready += back
    assert sorted(taken + ready) == [f"x{i}" for i in range(5)]
    assert (await queue.size(), await queue.in_flight()) == (0, len(taken))


@pytest.mark.parametrize("turns", range(1, 5))
async def test_a_claim_canceled_before_its_reply_gives_back_what_it_took(
    queue: RedisQueue, clock: FakeClock, turns: int
) -> None:
    await queue.push("x", priority=50)
    claim = asyncio.create_task(
        queue.claim_many(worker_id="w", lease_seconds=30, timeout_seconds=0, limit=5)
    )
    for _ in range(turns):
        await asyncio.sleep(0)  # queued, then written, then maybe answered
    claim.cancel()
    taken: list[str] = []
    with contextlib.suppress(asyncio.CancelledError):
        taken = await claim
    twin = await _close_and_look(queue, clock)
    try:
        assert (await twin.size(), await twin.in_flight()) == (
            1 - len(taken),
            len(taken),
        )
    finally:
        await twin.close()
