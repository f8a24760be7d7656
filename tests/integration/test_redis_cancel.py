"""A cancel the Redis client swallows still stops the queue's loops.

On Python 3.11, redis-py's socket writes go through ``asyncio.wait_for``, which
returns normally (dropping the cancel) when the write completes in the same loop
iteration as the cancel. These tests stand a client in that does exactly that,
every time, so the race is not left to chance.
"""

from __future__ import annotations

import asyncio
from typing import Any

import fakeredis
import pytest
from fakeredis.aioredis import FakeAsyncRedisConnection

from backgrounder.errors import QueueError
from backgrounder_redis import RedisQueue
from backgrounder_redis._common import raise_swallowed_cancel, translate_errors
from backgrounder_testing import FakeClock

pytestmark = pytest.mark.redis

#: The error guard touches its client only on a read-only reply.
NO_CLIENT: Any = None


async def ended_by_cancel(task: asyncio.Future[Any]) -> None:
    """Assert ``task`` ends canceled within 5 s (without waiting on it for ever)."""
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done, "the cancel was lost: the task is still running"
    assert task.cancelled()


async def _swallow_one_cancel() -> bool:
    """Wait until canceled and return normally, as 3.11's wait_for can."""
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        return True
    return False  # pragma: no cover - the event is never set


class SwallowingConnection(FakeAsyncRedisConnection):
    """A fakeredis connection whose first blocking pop's write drops a cancel.

    The write then goes out as usual, so a claim that missed the cancel goes on
    waiting (and a second cancel, at teardown, still ends it).
    """

    async def send_packed_command(self, command: Any, check_health: bool = True) -> Any:
        packed = command if isinstance(command, bytes | str) else b"".join(command)
        if "BLPOP" in str(packed):
            SwallowingClient.calls += 1
            if SwallowingClient.calls == 1:
                await _swallow_one_cancel()
        return await super().send_packed_command(command, check_health)


class SwallowingClient(fakeredis.FakeAsyncRedis):
    """A fakeredis client whose first blocking pop or pub/sub read drops a cancel.

    Later calls are the real ones, so a loop that missed the cancel goes on
    (and a second cancel, at teardown, still ends it).
    """

    calls = 0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(connection_class=SwallowingConnection, **kwargs)

    def pubsub(self, **kwargs: Any) -> Any:
        pubsub: Any = super().pubsub(**kwargs)
        real = pubsub.get_message

        async def get_message(**options: Any) -> Any:
            SwallowingClient.calls += 1
            if SwallowingClient.calls == 1:
                await _swallow_one_cancel()
                return None
            return await real(**options)

        pubsub.get_message = get_message
        return pubsub


async def test_the_error_guard_raises_a_cancel_the_commands_swallowed() -> None:
    async def body() -> str:
        async with translate_errors(NO_CLIENT, QueueError, "queue (wait)", "redis://x"):
            await _swallow_one_cancel()
        return "went on"

    task = asyncio.ensure_future(body())
    await asyncio.sleep(0)
    task.cancel()
    await ended_by_cancel(task)


async def test_no_cancel_means_no_error() -> None:
    raise_swallowed_cancel(0)  # no pending cancel: returns
    async with translate_errors(NO_CLIENT, QueueError, "queue (wait)", "redis://x"):
        await asyncio.sleep(0)


async def test_a_claim_waiting_on_a_frozen_clock_ends_when_canceled() -> None:
    """The claim loop's only other way out is the clock, which does not move."""
    server = fakeredis.FakeServer()
    queue = RedisQueue(
        prefix="swallow",
        client=SwallowingClient(server=server, decode_responses=True),
    )
    await queue.open(FakeClock())
    SwallowingClient.calls = 0
    claim = asyncio.ensure_future(
        queue.claim(worker_id="w", lease_seconds=5, timeout_seconds=60)
    )
    while SwallowingClient.calls == 0:
        await asyncio.sleep(0)
    claim.cancel()
    await ended_by_cancel(claim)
    assert SwallowingClient.calls == 1


async def test_the_cancel_listener_ends_when_canceled() -> None:
    server = fakeredis.FakeServer()
    queue = RedisQueue(
        prefix="swallow",
        client=SwallowingClient(server=server, decode_responses=True),
    )
    await queue.open(FakeClock())
    SwallowingClient.calls = 0
    cancellations = queue.cancellations()

    async def listen() -> None:
        async for _ in cancellations:
            pass

    listener = asyncio.ensure_future(listen())
    while SwallowingClient.calls == 0:
        await asyncio.sleep(0)
    listener.cancel()
    await ended_by_cancel(listener)
    assert SwallowingClient.calls == 1
    await cancellations.aclose()  # type: ignore[attr-defined]
