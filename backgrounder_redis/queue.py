"""RedisQueue: job ids by priority on Redis, shared by every process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc

from backgrounder.clock import Clock
from backgrounder.errors import QueueError
from backgrounder.queue.base import JobQueue
from backgrounder_redis._common import (
    RedisBackend,
    RedisSettings,
    cancel_count,
    raise_swallowed_cancel,
)

__all__ = ["RedisQueue"]

logger = logging.getLogger(__name__)


def _ignore_outcome(task: asyncio.Future[Any]) -> None:
    """Retrieve a best-effort call's outcome, so asyncio logs no warning."""
    if not task.cancelled():
        task.exception()


# Keys (KEYS order, the same in every script): ready (zset of id by
# (100 - priority) * 2**40 + seq), delayed (zset of id by due time), inflight
# (zset of id by claim-lease deadline), prio (hash id -> priority), seq (counter),
# wake (list a blocked claim waits on). Times are epoch seconds of the caller's clock.

_PUSH = """
local id, priority, due, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if redis.call('ZSCORE', KEYS[3], id) then return 0 end
if due <= tonumber(now) then
  -- Waiting and ready at this priority already: keep its place in the line.
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score and 100 - math.floor(tonumber(score) / 1099511627776) == priority then
    return 0
  end
end
redis.call('HSET', KEYS[4], id, priority)
redis.call('ZREM', KEYS[1], id)
redis.call('ZREM', KEYS[2], id)
if due > tonumber(now) then
  redis.call('ZADD', KEYS[2], due, id)
else
  local seq = redis.call('INCR', KEYS[5])
  redis.call('ZADD', KEYS[1], (100 - priority) * 1099511627776 + seq, id)
end
redis.call('LPUSH', KEYS[6], '1')
redis.call('LTRIM', KEYS[6], 0, 63)
return 1
"""

# ARGV: now, claim-lease deadline, how many at most. Returns the next due time
# of a delayed id ('' when none, or when ids were claimed), then the ids.
_CLAIM = """
local now, deadline, limit = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(due) do
  local priority = tonumber(redis.call('HGET', KEYS[4], id) or '50')
  local seq = redis.call('INCR', KEYS[5])
  redis.call('ZADD', KEYS[1], (100 - priority) * 1099511627776 + seq, id)
  redis.call('ZREM', KEYS[2], id)
end
local popped = redis.call('ZPOPMIN', KEYS[1], limit)
if popped[1] then
  local out = {''}
  for i = 1, #popped, 2 do
    redis.call('ZADD', KEYS[3], deadline, popped[i])
    out[#out + 1] = popped[i]
  end
  return out
end
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if nxt[2] then return {nxt[2]} end
return {''}
"""

# ARGV: the ids to ack.
_ACK = """
for _, id in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[3], id) == 1
     and not redis.call('ZSCORE', KEYS[1], id)
     and not redis.call('ZSCORE', KEYS[2], id) then
    redis.call('HDEL', KEYS[4], id)
  end
end
return 1
"""

_REMOVE = """
local n = redis.call('ZREM', KEYS[1], ARGV[1]) + redis.call('ZREM', KEYS[2], ARGV[1])
if n > 0 and not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  redis.call('HDEL', KEYS[4], ARGV[1])
end
return n
"""

_RECOVER = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[1],
                       'LIMIT', 0, 1000)
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[3], id)
  local priority = tonumber(redis.call('HGET', KEYS[4], id) or '50')
  local seq = redis.call('INCR', KEYS[5])
  redis.call('ZADD', KEYS[1], (100 - priority) * 1099511627776 + seq, id)
  redis.call('LPUSH', KEYS[6], '1')
end
redis.call('LTRIM', KEYS[6], 0, 63)
return ids
"""

# ARGV: claimed ids to make ready again now (ids no longer in flight are left).
_RELEASE = """
for _, id in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[3], id) == 1 then
    local priority = tonumber(redis.call('HGET', KEYS[4], id) or '50')
    local seq = redis.call('INCR', KEYS[5])
    redis.call('ZADD', KEYS[1], (100 - priority) * 1099511627776 + seq, id)
    redis.call('LPUSH', KEYS[6], '1')
  end
end
redis.call('LTRIM', KEYS[6], 0, 63)
return 1
"""


class RedisQueue(RedisBackend, JobQueue):
    """A priority queue of job ids on Redis, shared by every worker and API process.

    Higher priority first, FIFO within a priority. A claim is one Lua script: it
    promotes due delayed ids, pops the best ready id and records it in flight with
    a lease deadline, so an id leaves "ready" only inside that atomic step. A claim
    with nothing ready blocks on a wake-up list (BLPOP with a bounded timeout)
    that every push feeds; an interrupted wait loses only a wake-up token, never
    an id. Cancels travel over pub/sub.

    Times are wall-clock epoch seconds of the injected clock, so leases and delays
    mean the same in every process (and a FakeClock drives them in tests).
    """

    name = "redis"

    kind = "queue"
    error_type = QueueError
    script_bodies = {
        "push": _PUSH,
        "claim": _CLAIM,
        "ack": _ACK,
        "remove": _REMOVE,
        "recover": _RECOVER,
        "release": _RELEASE,
    }

    def __init__(
        self,
        redis_url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str | None = None,
        settings: RedisSettings | None = None,
        client: aioredis.Redis | None = None,
    ) -> None:
        """Keep the options (see RedisBackend); nothing connects until ``open()``."""
        super().__init__(redis_url, prefix=prefix, settings=settings, client=client)
        p = self.prefix
        self.keys = [
            f"{p}:q:ready",
            f"{p}:q:delayed",
            f"{p}:q:inflight",
            f"{p}:q:prio",
            f"{p}:q:seq",
            f"{p}:q:wake",
        ]
        self.channel = f"{p}:q:cancel"
        #: Claims whose caller was canceled, finishing in the background, and
        #: the scripts giving back what they took.
        self._orphans: set[asyncio.Future[Any]] = set()

    def _now(self) -> float:
        return self._clock.now().timestamp()

    async def open(self, clock: Clock) -> None:
        """Connect and check the server answers."""
        await self._connect(clock)
        await self.ping()

    async def ping(self) -> None:
        """PING the server; raise QueueError if it does not answer."""
        async with self._errors("ping"):
            await self.client.ping()

    async def _run(self, name: str, *args: Any) -> Any:
        return await self._script(name, self.keys, args)

    async def push(
        self, job_id: str, *, priority: int, delay_seconds: float = 0.0
    ) -> None:
        """Make ``job_id`` claimable (idempotent; an id in flight is left alone)."""
        if not 0 <= priority <= 100:
            raise ValueError(f"priority must be 0-100 (got {priority!r})")
        now = self._now()
        due = now + delay_seconds if delay_seconds > 0 else 0.0
        await self._run("push", job_id, priority, repr(due), repr(now))

    async def claim(
        self, *, worker_id: str, lease_seconds: float, timeout_seconds: float
    ) -> str | None:
        """Claim the best id, blocking on the wake-up list up to the timeout."""
        ids = await self.claim_many(
            worker_id=worker_id,
            lease_seconds=lease_seconds,
            timeout_seconds=timeout_seconds,
            limit=1,
        )
        return ids[0] if ids else None

    async def claim_many(
        self,
        *,
        worker_id: str,
        lease_seconds: float,
        timeout_seconds: float,
        limit: int,
    ) -> list[str]:
        """Claim up to ``limit`` of the best ids in one script, each with its
        lease; block on the wake-up list only while none is claimable."""
        if limit < 1:
            return []
        deadline = self._clock.monotonic() + timeout_seconds
        now = self._now()
        reply = await self._claim_now((repr(now), repr(now + lease_seconds), limit))
        while True:
            next_due, *ids = reply
            if ids:
                if logger.isEnabledFor(logging.DEBUG):
                    for job_id in ids:
                        logger.debug("job %s claimed by %s", job_id, worker_id)
                return [str(job_id) for job_id in ids]
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                return []
            now = self._now()
            claim = (repr(now), repr(now + lease_seconds), limit)
            if next_due and float(next_due) <= now:
                # A delayed id came due: claim it now, without waiting.
                reply = await self._claim_now(claim)
                continue
            # Never block longer than half the claim lease: the claim behind
            # the wait takes its lease from the time it was sent.
            wait = min(remaining, self.settings.max_block_seconds, lease_seconds / 2)
            if next_due:
                wait = min(wait, float(next_due) - now)
            reply = await self._wait_then_claim(wait, claim)

    async def _claim_now(self, claim: tuple[str, str, int]) -> list[Any]:
        """Run the claim script in the pipeline; a canceled caller's ids go back.

        The script is on its way (or run) once queued, whether or not the caller
        stays: its reply is kept from the cancel, and what it took is made ready
        again at once instead of waiting for the claim lease.
        """
        reply = self._enqueue(self._script_args("claim", self.keys, claim))
        try:
            result: list[Any] = await asyncio.shield(reply)
        except asyncio.CancelledError:
            self._adopt(reply)
            raise
        except (rexc.RedisError, OSError) as exc:
            raise await self._failure(exc, "claim") from exc
        return result

    def _adopt(self, reply: asyncio.Future[list[Any]]) -> None:
        """Give back, once it is in, what the claim of a canceled caller took."""
        self._orphans.add(reply)
        reply.add_done_callback(self._give_back)

    async def _wait_then_claim(
        self, wait: float, claim: tuple[str, str, int]
    ) -> list[Any]:
        """Block on the wake-up list, then claim, in one write.

        BLPOP and the claim script go out together on a pooled connection of
        their own (a blocking command would stall the shared pipeline): the
        server runs the claim the moment the wait ends, a push's wake-up or the
        timeout, so a job pushed onto an idle worker costs no extra round trip.

        The server runs that claim even if the caller is canceled meanwhile, so
        the exchange runs in a task of its own that a cancel does not stop: the
        wait is cut short (CLIENT UNBLOCK), the replies are read, and ids the
        claim took are made ready again at once.
        """
        state: dict[str, Any] = {}
        exchange = asyncio.ensure_future(self._blocking_claim(wait, claim, state))
        try:
            return await asyncio.shield(exchange)
        except asyncio.CancelledError:
            # Also when the exchange ended in the very turn the cancel came:
            # its ids are then in hand, and nobody else will start them.
            self._adopt(exchange)
            state["abandoned"] = True
            if not exchange.done() and "client_id" in state:
                self._unblock(state["client_id"])
            raise

    def _unblock(self, client_id: Any) -> None:
        """End the wait of connection ``client_id`` now (best effort)."""
        unblock = asyncio.ensure_future(
            self._call("unblock", "CLIENT", "UNBLOCK", client_id)
        )
        unblock.add_done_callback(_ignore_outcome)

    async def _blocking_claim(
        self, wait: float, claim: tuple[str, str, int], state: dict[str, Any]
    ) -> list[Any]:
        # BLPOP's timeout 0 means forever: never ask for less than 10 ms.
        commands = [
            ("CLIENT", "ID"),
            ("BLPOP", self.keys[5], max(0.01, wait)),
            self._script_args("claim", self.keys, claim),
        ]
        async with self._errors("wait"):
            pool: Any = self.client.connection_pool
            conn = await pool.get_connection()
            try:
                if state.get("abandoned"):
                    # The caller left while a connection was found: send nothing.
                    return [""]
                await conn.send_packed_command(conn.pack_commands(commands))
                state["client_id"] = await conn.read_response()
                if state.get("abandoned"):
                    self._unblock(state["client_id"])
                await conn.read_response()
                try:
                    reply: list[Any] = await conn.read_response()
                except rexc.NoScriptError:
                    # The server lost its scripts; the pipeline loads it again.
                    reply = await self._run("claim", *claim)
            except BaseException:
                # The connection may be mid-reply: it is not used again. A claim
                # that ran but whose reply is lost holds its ids until their
                # claim lease runs out; then they return (recover_expired).
                await conn.disconnect(nowait=True)
                raise
            finally:
                await pool.release(conn)
        return reply

    def _give_back(self, exchange: asyncio.Future[list[Any]]) -> None:
        """Make ready again what a canceled caller's claim took."""
        self._orphans.discard(exchange)
        if exchange.cancelled() or exchange.exception() is not None:
            return
        ids = [str(job_id) for job_id in exchange.result()[1:]]
        if not ids:
            return
        for job_id in ids:
            logger.debug("job %s claimed for a canceled caller; ready again", job_id)
        task = asyncio.ensure_future(self._run("release", *ids))
        self._orphans.add(task)

        def released(task: asyncio.Future[Any]) -> None:
            self._orphans.discard(task)
            error = None if task.cancelled() else task.exception()
            for job_id in ids if error is not None else ():
                logger.warning(
                    "job %s, claimed for a canceled caller, could not be made ready "
                    "(%s); it returns when its claim lease runs out",
                    job_id,
                    error,
                    extra={"job_id": job_id, "event": "queue.release_failed"},
                )

        task.add_done_callback(released)

    async def close(self) -> None:
        """Let canceled waits give their ids back, then close the connections."""
        deadline = self.settings.socket_timeout
        while self._orphans:
            pending = set(self._orphans)
            done, _ = await asyncio.wait(pending, timeout=deadline)
            if not done:
                for task in pending:
                    task.cancel()
                break
        await super().close()

    async def ack(self, job_id: str) -> None:
        """Drop a claimed id for good."""
        await self._run("ack", job_id)

    async def ack_many(self, job_ids: Sequence[str]) -> None:
        """Drop claimed ids for good, in one script."""
        if job_ids:
            await self._run("ack", *job_ids)

    async def remove(self, job_id: str) -> bool:
        """Drop a waiting id; return True if it was waiting."""
        return bool(await self._run("remove", job_id))

    async def recover_expired(self) -> int:
        """Put claimed ids whose claim lease ran out back, keeping their priority."""
        ids = await self._run("recover", repr(self._now()))
        for job_id in ids:
            logger.warning(
                "job %s: claim lease ran out before the job started; queued again",
                job_id,
                extra={"job_id": job_id, "event": "queue.claim_expired"},
            )
        return len(ids)

    async def size(self) -> int:
        """Return how many ids wait (ready and delayed)."""
        ready, delayed = await self._call_many(
            "size", [("ZCARD", self.keys[0]), ("ZCARD", self.keys[1])]
        )
        return int(ready) + int(delayed)

    async def in_flight(self) -> int:
        """Return how many ids are claimed and not yet acked."""
        return int(await self._call("size", "ZCARD", self.keys[2]))

    async def publish_cancel(self, job_id: str) -> None:
        """Publish a cancel to every worker process listening."""
        await self._call("publish", "PUBLISH", self.channel, job_id)

    def cancellations(self) -> AsyncIterator[str]:
        """Return an iterator of published cancels that resubscribes on its own."""
        return _Cancellations(self)


class _Cancellations:
    """Published cancels; a lost subscription is made again with backoff.

    A connection that went silent is found by PINGing the subscription when no
    message came for ``socket_timeout`` seconds and expecting the pong in time.
    """

    def __init__(self, queue: RedisQueue) -> None:
        self._queue = queue
        self._pubsub: Any = None
        self._backoff = 0.1
        self._last_heard = 0.0
        self._ping_sent: float | None = None
        self._lost = False
        self._subscribed_once = False
        # Pending cancels of the listening task when it first asked for a message.
        self._cancels: int | None = None

    def __aiter__(self) -> _Cancellations:
        return self

    async def _subscribe(self) -> None:
        pubsub: Any = self._queue.client.pubsub()
        try:
            await pubsub.subscribe(self._queue.channel)
        except BaseException:
            await pubsub.aclose()
            raise
        self._pubsub = pubsub
        self._last_heard = asyncio.get_running_loop().time()
        self._ping_sent = None
        self._backoff = 0.1

    def _confirmed(self) -> None:
        """Note a subscribe confirmation; every one after the first is a reconnect."""
        if self._subscribed_once:
            logger.info(
                "subscription to cancels on %s made again after a reconnect",
                self._queue.channel,
                extra={"event": "queue.resubscribed"},
            )
        self._subscribed_once = True
        self._lost = False

    async def _drop(self, reason: object) -> None:
        if not self._lost:
            logger.warning(
                "subscription to cancels on %s lost: %s; subscribing again",
                self._queue.channel,
                reason,
                extra={"event": "queue.subscription_lost"},
            )
        self._lost = True
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except Exception:
                logger.debug("closing a broken subscription failed", exc_info=True)

    async def __anext__(self) -> str:
        loop = asyncio.get_running_loop()
        timeout = self._queue.settings.socket_timeout
        if self._cancels is None:
            self._cancels = cancel_count()
        while True:
            # redis-py waits through asyncio.wait_for, which can drop a cancel on
            # Python 3.11: without this check the listener would never stop.
            raise_swallowed_cancel(self._cancels)
            try:
                if self._pubsub is None:
                    await self._subscribe()
                message = await self._pubsub.get_message(timeout=1.0)
                raise_swallowed_cancel(self._cancels)
                now = loop.time()
                if message is not None:
                    self._last_heard = now
                    self._ping_sent = None
                    kind = message.get("type")
                    if kind == "message":
                        return str(message["data"])
                    if kind == "subscribe":
                        self._confirmed()
                    continue
                if self._ping_sent is not None:
                    if now - self._ping_sent > timeout:
                        await self._drop("no answer to PING")
                elif now - self._last_heard > timeout:
                    await self._pubsub.ping()
                    self._ping_sent = now
            except (rexc.RedisError, OSError) as exc:
                await self._drop(exc)
                await self._queue._clock.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, 5.0)

    async def aclose(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except Exception:
                logger.debug("closing the subscription failed", exc_info=True)
