"""The JobQueue contract, proved against every queue (see conftest.py)."""

from __future__ import annotations

import asyncio

from backgrounder.queue.base import JobQueue
from backgrounder_testing import FakeClock


async def claim(queue: JobQueue, lease: float = 30.0) -> str | None:
    return await queue.claim(worker_id="w", lease_seconds=lease, timeout_seconds=0)


async def drain(queue: JobQueue) -> list[str]:
    out = []
    while (job_id := await claim(queue)) is not None:
        out.append(job_id)
    return out


async def test_priority_order_then_fifo(queue: JobQueue) -> None:
    for job_id, priority in [("a", 10), ("b", 90), ("c", 50), ("d", 90), ("e", 10)]:
        await queue.push(job_id, priority=priority)
    assert await drain(queue) == ["b", "d", "c", "a", "e"]


async def test_priority_bounds_zero_and_hundred(queue: JobQueue) -> None:
    await queue.push("low", priority=0)
    await queue.push("high", priority=100)
    assert await drain(queue) == ["high", "low"]


async def test_claim_on_empty_queue_returns_none(queue: JobQueue) -> None:
    assert await claim(queue) is None


async def test_delayed_item_waits_for_its_time(
    queue: JobQueue, clock: FakeClock
) -> None:
    await queue.push("later", priority=50, delay_seconds=10)
    await queue.push("now", priority=10)
    assert await queue.size() == 2
    assert await drain(queue) == ["now"]
    clock.advance(10.5)
    assert await drain(queue) == ["later"]


async def test_push_is_idempotent(queue: JobQueue) -> None:
    await queue.push("x", priority=50)
    await queue.push("x", priority=50)
    assert await queue.size() == 1
    assert await drain(queue) == ["x"]


async def test_push_of_a_claimed_id_is_ignored(queue: JobQueue) -> None:
    await queue.push("x", priority=50)
    assert await claim(queue) == "x"
    await queue.push("x", priority=50)
    assert await queue.size() == 0
    assert await claim(queue) is None


async def test_push_again_takes_the_new_priority_and_delay(
    queue: JobQueue, clock: FakeClock
) -> None:
    await queue.push("x", priority=10)
    await queue.push("y", priority=50)
    await queue.push("x", priority=90)
    await queue.push("y", priority=50, delay_seconds=5)
    assert await drain(queue) == ["x"]
    clock.advance(6)
    assert await drain(queue) == ["y"]


async def test_acked_claim_never_returns(queue: JobQueue, clock: FakeClock) -> None:
    await queue.push("x", priority=50)
    assert await claim(queue, lease=5) == "x"
    await queue.ack("x")
    clock.advance(10)
    assert await queue.recover_expired() == 0
    assert await claim(queue) is None


async def test_expired_claim_returns_with_its_priority(
    queue: JobQueue, clock: FakeClock
) -> None:
    await queue.push("x", priority=80)
    assert await claim(queue, lease=5) == "x"
    await queue.push("y", priority=20)
    clock.advance(2)
    assert await queue.recover_expired() == 0
    clock.advance(4)
    assert await queue.recover_expired() == 1
    assert await drain(queue) == ["x", "y"]


async def test_remove_drops_a_waiting_id(queue: JobQueue, clock: FakeClock) -> None:
    await queue.push("x", priority=50)
    await queue.push("d", priority=50, delay_seconds=5)
    assert await queue.remove("x")
    assert await queue.remove("d")
    assert not await queue.remove("x")
    assert not await queue.remove("never")
    clock.advance(10)
    assert await claim(queue) is None
    assert await queue.size() == 0


async def test_size_counts_waiting_and_delayed_not_claimed(queue: JobQueue) -> None:
    await queue.push("a", priority=50)
    await queue.push("b", priority=50)
    await queue.push("c", priority=50, delay_seconds=60)
    assert await queue.size() == 3
    await claim(queue)
    assert await queue.size() == 2


async def test_blocked_claim_wakes_on_push(queue: JobQueue) -> None:
    waiter = asyncio.create_task(
        queue.claim(worker_id="w", lease_seconds=30, timeout_seconds=60)
    )
    await asyncio.sleep(0.05)  # let the claim reach its wait; not a synchronisation
    assert not waiter.done()
    await queue.push("x", priority=50)
    async with asyncio.timeout(5):
        assert await waiter == "x"


async def test_concurrent_claims_take_each_id_once(queue: JobQueue) -> None:
    for i in range(10):
        await queue.push(f"j{i}", priority=50)
    results = await asyncio.gather(*[claim(queue) for _ in range(20)])
    taken = [r for r in results if r is not None]
    assert sorted(taken) == sorted(f"j{i}" for i in range(10))


async def test_published_cancel_reaches_listeners(queue: JobQueue) -> None:
    cancellations = queue.cancellations()
    if cancellations is None:
        # A queue may leave cancels to the store's heartbeat; then publishing is a
        # harmless no-op.
        await queue.publish_cancel("x")
        return
    try:
        async with asyncio.timeout(10):
            first = asyncio.ensure_future(cancellations.__anext__())
            # A subscription is made on the first read; publish until it is heard.
            while not first.done():
                await queue.publish_cancel("job-1")
                await asyncio.wait({first}, timeout=0.1)
            assert first.result() == "job-1"
    finally:
        await cancellations.aclose()  # type: ignore[attr-defined]


async def test_ping_answers(queue: JobQueue) -> None:
    await queue.ping()


async def test_push_again_keeps_the_place_of_a_ready_id(queue: JobQueue) -> None:
    # The manager re-pushes long-waiting queued jobs (pushes are idempotent);
    # that must not send them behind jobs submitted after them.
    await queue.push("old", priority=50)
    await queue.push("new", priority=50)
    await queue.push("old", priority=50)
    assert await drain(queue) == ["old", "new"]


async def claim_many(queue: JobQueue, limit: int, lease: float = 30.0) -> list[str]:
    return await queue.claim_many(
        worker_id="w", lease_seconds=lease, timeout_seconds=0, limit=limit
    )


async def test_claim_many_takes_the_best_ids_up_to_the_limit(
    queue: JobQueue, clock: FakeClock
) -> None:
    for job_id, priority in [("a", 10), ("b", 90), ("c", 50), ("d", 90), ("e", 10)]:
        await queue.push(job_id, priority=priority)
    await queue.push("later", priority=100, delay_seconds=10)
    assert await claim_many(queue, 3) == ["b", "d", "c"]
    assert await claim_many(queue, 10) == ["a", "e"]
    assert await claim_many(queue, 10) == []
    clock.advance(11)
    assert await claim_many(queue, 10) == ["later"]


async def test_claim_many_gives_each_id_its_own_lease(
    queue: JobQueue, clock: FakeClock
) -> None:
    for job_id in ("a", "b", "c"):
        await queue.push(job_id, priority=50)
    assert await claim_many(queue, 3, lease=5) == ["a", "b", "c"]
    await queue.ack_many(["a", "c"])
    clock.advance(6)
    assert await queue.recover_expired() == 1
    assert await claim_many(queue, 3, lease=5) == ["b"]
    await queue.ack_many([])
    clock.advance(6)
    assert await queue.recover_expired() == 1


async def test_acked_many_never_return(queue: JobQueue, clock: FakeClock) -> None:
    for job_id in ("a", "b"):
        await queue.push(job_id, priority=50)
    assert await claim_many(queue, 2, lease=5) == ["a", "b"]
    await queue.ack_many(["a", "b"])
    clock.advance(10)
    assert await queue.recover_expired() == 0
    assert await claim_many(queue, 2) == []


async def test_blocked_claim_many_wakes_on_push(queue: JobQueue) -> None:
    waiter = asyncio.create_task(
        queue.claim_many(worker_id="w", lease_seconds=30, timeout_seconds=60, limit=5)
    )
    await asyncio.sleep(0.05)  # let the claim reach its wait; not a synchronisation
    assert not waiter.done()
    await queue.push("x", priority=50)
    async with asyncio.timeout(5):
        assert await waiter == ["x"]


async def test_concurrent_claim_many_take_each_id_once(queue: JobQueue) -> None:
    for i in range(25):
        await queue.push(f"j{i}", priority=50)
    results = await asyncio.gather(*[claim_many(queue, 4) for _ in range(10)])
    taken = [job_id for batch in results for job_id in batch]
    assert all(len(batch) <= 4 for batch in results)
    assert sorted(taken) == sorted(f"j{i}" for i in range(25))
