"""What RedisQueue and RedisStore share: URL parsing, the client, error translation,
and the pipelining of commands that many tasks make at once."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis._parsers.base import BaseParser
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

try:
    import hiredis as _hiredis

    hiredis: Any = _hiredis
except ImportError:  # pragma: no cover - the redis extra installs it
    hiredis = None

from backgrounder.clock import Clock, SystemClock
from backgrounder.errors import BackendError, ConfigurationError

__all__ = [
    "DEFAULT_PREFIX",
    "RedisBackend",
    "RedisSettings",
    "cancel_count",
    "close_client",
    "is_read_only",
    "make_client",
    "mask_url",
    "parse_url",
    "raise_swallowed_cancel",
    "translate_errors",
]

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "backgrounder"


@dataclass(frozen=True)
class RedisSettings:
    """How a Redis backend connects.

    Attributes:
        socket_timeout: Seconds a command may wait for a reply. A blocking wait is
            always shorter than this, so a connection that went silent shows up as
            a timeout instead of a hang.
        socket_connect_timeout: Seconds a (re)connect may take.
        health_check_interval: An idle pooled connection is PINGed before reuse
            when it has been idle this long.
        max_block_seconds: The longest single blocking wait of a claim.
        max_connections: Pooled connections per backend; a command that finds
            them all busy waits up to ``socket_timeout`` for one.
    """

    socket_timeout: float = 5.0
    socket_connect_timeout: float = 3.0
    health_check_interval: float = 15.0
    max_block_seconds: float = 2.0
    max_connections: int = 50

    def __post_init__(self) -> None:
        if self.max_block_seconds >= self.socket_timeout:
            raise ConfigurationError(
                f"max_block_seconds ({self.max_block_seconds}) must be shorter than "
                f"socket_timeout ({self.socket_timeout}), or a blocking wait times out"
            )


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def parse_url(url: str) -> tuple[str, str | None]:
    """Split the backgrounder options off a Redis URL.

    Returns:
        The URL for redis-py (without ``prefix``) and the ``prefix`` option or None.

    Raises:
        ConfigurationError: The scheme is not redis:// or rediss://, or prefix is
            empty.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigurationError(
            f"not a Redis URL: {mask_url(url)!r}; use redis://host:6379/0?prefix=app"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = None
    rest = []
    for key, value in query:
        if key == "prefix":
            if not value:
                raise ConfigurationError(
                    f"empty prefix in {mask_url(url)!r}; leave it out for the default"
                )
            prefix = value
        else:
            rest.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(rest))), prefix


def make_client(url: str, settings: RedisSettings) -> aioredis.Redis:
    """Build a redis-py asyncio client with timeouts and one reconnect on errors.

    The pool blocks (up to ``socket_timeout``) when every connection is busy, so a
    burst of submits waits its turn instead of failing.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.max_connections,
        timeout=settings.socket_timeout,
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.socket_connect_timeout,
        health_check_interval=settings.health_check_interval,
        # One immediate retry on a fresh connection covers a connection the server
        # closed while it sat idle; longer outages surface as errors, and the
        # worker and manager loops back off and try again.
        retry=Retry(NoBackoff(), 1, supported_errors=(rexc.ConnectionError,)),
        decode_responses=True,
    )
    return aioredis.Redis.from_pool(pool)


async def close_client(client: aioredis.Redis, seconds: float) -> None:
    """Close ``client``'s pool, giving up after ``seconds`` so close never hangs."""
    try:
        async with asyncio.timeout(seconds):
            await client.aclose()
    except (TimeoutError, rexc.RedisError, OSError) as exc:
        logger.warning("closing the Redis connections did not finish: %s", exc)


def is_read_only(exc: BaseException) -> bool:
    """Tell whether ``exc`` says the server is a read-only replica."""
    if isinstance(exc, rexc.ReadOnlyError):
        return True
    return isinstance(exc, rexc.ResponseError) and "READONLY" in str(exc)


@contextlib.asynccontextmanager
async def translate_errors(
    client: aioredis.Redis,
    error_type: type[BackendError],
    what: str,
    url: str,
) -> AsyncIterator[None]:
    """Turn redis-py errors into ``error_type`` (StoreError or QueueError).

    A read-only reply (the server was demoted to a replica) also drops every pooled
    connection, so the next command connects again, perhaps to the new primary.

    A cancel that arrived during the commands and that the client swallowed is
    raised again on the way out (see ``raise_swallowed_cancel``).
    """
    cancels = cancel_count()
    try:
        yield
    except (rexc.RedisError, OSError) as exc:
        if is_read_only(exc):
            await _disconnect(client)
        raise translated(exc, error_type, what, url) from exc
    raise_swallowed_cancel(cancels)


def translated(
    exc: BaseException, error_type: type[BackendError], what: str, url: str
) -> BackendError:
    """Return the ``error_type`` that ``exc`` (a redis-py error or OSError) becomes.

    The same messages as ``translate_errors``; the caller drops the pooled
    connections itself when ``is_read_only(exc)``.
    """
    where = mask_url(url)
    if is_read_only(exc):
        return error_type(
            f"Redis {what} at {where} is read-only (a replica after a failover?): "
            f"{exc}; the connection will be made again"
        )
    if isinstance(exc, rexc.ConnectionError | rexc.TimeoutError | OSError):
        return error_type(
            f"Redis {what} at {where} is unreachable: {exc}; check that the "
            "server is up and the URL is right"
        )
    return error_type(f"Redis {what} at {where} failed: {exc}")


def cancel_count() -> int:
    """Return how many cancels of the current task are pending (0 outside a task)."""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def raise_swallowed_cancel(before: int) -> None:
    """Raise CancelledError if the task was canceled since ``before`` was read.

    On Python 3.11, ``asyncio.wait_for`` (which redis-py wraps around every socket
    write) returns normally, dropping the cancel, when the write completes in the
    same loop iteration as the cancel. The caller then goes on as if nothing
    happened: a claim keeps waiting for work, a recovery loop sleeps again, and
    whoever canceled it (a worker stopping, a manager closing) waits for ever. The
    task's count of pending cancels still shows the request, so it is honoured
    here.

    Raises:
        asyncio.CancelledError: The current task has more pending cancels than
            ``before``.
    """
    if cancel_count() > before:
        raise asyncio.CancelledError()


async def _disconnect(client: aioredis.Redis) -> None:
    pool: Any = client.connection_pool
    try:
        await pool.disconnect()
    except Exception:  # pragma: no cover - best effort
        logger.debug("dropping Redis connections failed", exc_info=True)


async def _retire(client: aioredis.Redis, conn: Any) -> None:
    """Disconnect a broken connection and give it back to the pool."""
    with contextlib.suppress(Exception):
        await conn.disconnect(nowait=True)
    pool: Any = client.connection_pool
    await pool.release(conn)


#: A command waiting for its turn, and the future its caller awaits.
_Pending = tuple[tuple[Any, ...], "asyncio.Future[Any]"]

_NOT_ENOUGH_DATA = object()


class _Wire:
    """The pipeline connection spoken to directly: hiredis packs and parses.

    redis-py makes the connection (TLS, AUTH, SELECT, HELLO); then every write
    is one ``transport.write`` of packed commands, and one reader task feeds
    what arrives to a hiredis reader and hands each reply to the next waiting
    future, in order. A future whose caller went away is skipped, never
    unqueued, so replies and callers stay matched.
    """

    def __init__(self, conn: Any, timeout: float) -> None:
        self.conn = conn
        self.timeout = timeout
        self.writer: asyncio.StreamWriter = conn._writer
        self.stream: asyncio.StreamReader = conn._reader
        kwargs: dict[str, Any] = {
            "protocolError": rexc.InvalidResponse,
            "replyError": BaseParser.parse_error,
            "notEnoughData": _NOT_ENOUGH_DATA,
        }
        if conn.encoder.decode_responses:
            kwargs["encoding"] = conn.encoder.encoding
            kwargs["errors"] = conn.encoder.encoding_errors
        self.parser: Any = hiredis.Reader(**kwargs)
        self.push_type: Any = getattr(hiredis, "PushNotification", None)
        self.waiting: deque[_Pending] = deque()
        self.timer: asyncio.Timeout | None = None
        self.reader: asyncio.Task[None] | None = None
        self.broken = False

    @staticmethod
    def usable(conn: Any) -> bool:
        return (
            hiredis is not None
            and isinstance(getattr(conn, "_reader", None), asyncio.StreamReader)
            and isinstance(getattr(conn, "_writer", None), asyncio.StreamWriter)
        )

    def write(self, batch: list[_Pending]) -> None:
        pack = hiredis.pack_command
        self.writer.write(b"".join([pack(args) for args, _ in batch]))
        was_idle = not self.waiting
        self.waiting.extend(batch)
        timer = self.timer
        if was_idle and timer is not None and timer.when() is None:
            timer.reschedule(asyncio.get_running_loop().time() + self.timeout)


class RedisBackend:
    """What RedisQueue and RedisStore share: the URL, prefix, client and scripts.

    A subclass names its kind ("queue", "store"), the error it raises, and the
    Lua scripts ``open()`` registers.

    Commands (``_call``, ``_script``, ``_call_many``) are pipelined: the first
    goes out at once on a connection this backend keeps, and every command made
    while a round trip is in flight waits and then goes out with the others in
    one write. Replies are matched to callers in order; an error reply raises
    only for the command that caused it. Scripts are sent as EVALSHA; one the
    server no longer knows (a restart, SCRIPT FLUSH) is sent again as EVAL,
    which also loads it. Blocking commands and pub/sub use connections of their
    own from the pool.
    """

    kind = "backend"
    error_type: type[BackendError] = BackendError
    script_bodies: dict[str, str] = {}

    def __init__(
        self,
        redis_url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str | None = None,
        settings: RedisSettings | None = None,
        client: aioredis.Redis | None = None,
    ) -> None:
        """Keep the options; nothing connects until ``open()``.

        Args:
            redis_url: ``redis://`` or ``rediss://`` URL (database number from its
                path, ``?prefix=`` allowed).
            prefix: Key prefix; beats the URL's ``prefix``; default "backgrounder".
            settings: Timeouts of the connection.
            client: A ready client (fakeredis in tests); the URL is then a label.
        """
        self.url, url_prefix = parse_url(redis_url)
        self.prefix = prefix or url_prefix or DEFAULT_PREFIX
        self.settings = settings or RedisSettings()
        self._client = client
        self._own_client = client is None
        self._clock: Clock = SystemClock()
        #: Script name -> SHA1 of its body, and SHA1 -> body (for NOSCRIPT).
        self._shas: dict[str, str] = {
            name: hashlib.sha1(body.encode()).hexdigest()
            for name, body in self.script_bodies.items()
        }
        self._bodies = {sha: self.script_bodies[n] for n, sha in self._shas.items()}
        self._pending: list[_Pending] = []
        self._sender: asyncio.Task[None] | None = None
        self._conn: Any = None
        self._wire: _Wire | None = None
        #: A flush (callback or sender task) will take what is pending.
        self._scheduled = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({mask_url(self.url)!r}, prefix={self.prefix!r})"

    @property
    def client(self) -> aioredis.Redis:
        """The connected client; raises the backend's error before ``open()``."""
        if self._client is None:
            raise self.error_type(
                f"{self.kind} {self!r} is not open; call open() first"
            )
        return self._client

    def _errors(self, what: str) -> Any:
        return translate_errors(
            self.client, self.error_type, f"{self.kind} ({what})", self.url
        )

    async def _connect(self, clock: Clock) -> None:
        """Make the client (unless one was passed); scripts load on first use."""
        self._clock = clock
        if self._client is None:
            self._client = make_client(self.url, self.settings)
        self._pending = []
        self._sender = None
        self._conn = None
        self._wire = None
        self._scheduled = False

    async def close(self) -> None:
        """Close the connection pool (a client passed in is left open)."""
        sender, self._sender = self._sender, None
        if sender is not None and not sender.done():
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        self._fail(self._pending, 0, rexc.ConnectionError("the backend was closed"))
        self._pending = []
        wire = self._wire
        if wire is not None:
            self._drop_wire(wire, rexc.ConnectionError("the backend was closed"))
            if wire.reader is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await wire.reader
        self._scheduled = False
        client, self._client = self._client, None
        conn, self._conn = self._conn, None
        if conn is not None and client is not None:
            try:
                await client.connection_pool.release(conn)
            except Exception:  # pragma: no cover - best effort
                logger.debug("returning the pipeline connection failed", exc_info=True)
        if client is not None and self._own_client:
            await close_client(client, self.settings.socket_timeout)

    # ------------------------------------------------------------ pipelining

    def _enqueue(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Queue one command for the next write; return the future of its reply."""
        if self._client is None:
            raise self.error_type(
                f"{self.kind} {self!r} is not open; call open() first"
            )
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((args, future))
        if not self._scheduled:
            self._scheduled = True
            wire = self._wire
            if wire is None:
                self._sender = loop.create_task(self._send_all())
            elif not wire.waiting:
                # Everything asked for in this loop iteration goes in one write.
                loop.call_soon(self._flush)
            # else: a round trip is in flight; its reader writes what gathered
            # meanwhile as soon as replies come, in one write.
        return future

    def _flush(self) -> None:
        """Write what is pending on the wire (a loop callback)."""
        wire = self._wire
        if wire is None:
            # The wire broke since this was scheduled: connect again first.
            if self._sender is None:
                loop = asyncio.get_running_loop()
                self._sender = loop.create_task(self._send_all())
            return
        self._scheduled = False
        batch, self._pending = self._pending, []
        # A caller cancelled before the write: its command need not go out.
        batch = [item for item in batch if not item[1].done()]
        if batch:
            wire.write(batch)

    def _drop_wire(self, wire: _Wire, exc: BaseException) -> None:
        """Forget a broken wire; its unanswered commands fail with ``exc``."""
        if wire.broken:
            return
        if self._wire is wire:
            self._wire = None
        wire.broken = True
        waiting = list(wire.waiting)
        wire.waiting.clear()
        self._fail(waiting, 0, exc)
        if wire.reader is not None and wire.reader is not asyncio.current_task():
            wire.reader.cancel()
        if self._conn is wire.conn:
            self._conn = None
        with contextlib.suppress(Exception):
            wire.writer.transport.abort()
        client = self._client
        if client is not None:
            loop = asyncio.get_running_loop()
            task = loop.create_task(_retire(client, wire.conn))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            if self._pending and self._sender is None:
                # Commands that were waiting for this wire's replies go out on
                # a new connection.
                self._scheduled = True
                self._sender = loop.create_task(self._send_all())

    async def _read_replies(self, wire: _Wire) -> None:
        """Hand each reply on ``wire`` to the next waiting future, in order."""
        loop = asyncio.get_running_loop()
        parser = wire.parser
        waiting = wire.waiting
        try:
            while True:
                deadline = loop.time() + wire.timeout if waiting else None
                async with asyncio.timeout_at(deadline) as timer:
                    wire.timer = timer
                    data = await wire.stream.read(1 << 16)
                wire.timer = None
                if not data:
                    raise rexc.ConnectionError("the server closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not _NOT_ENOUGH_DATA:
                    if wire.push_type is not None and isinstance(reply, wire.push_type):
                        continue  # not an answer to a command
                    args, future = waiting.popleft()
                    if future.done():
                        continue
                    if isinstance(reply, rexc.NoScriptError) and args[0] == "EVALSHA":
                        # The server lost its scripts: EVAL runs and loads it.
                        body = self._bodies[args[1]]
                        self._resend((("EVAL", body, *args[2:]), future))
                    elif isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
                if self._pending and self._wire is wire:
                    self._flush()
        except asyncio.CancelledError:
            self._drop_wire(wire, rexc.ConnectionError("the backend was closed"))
            raise
        except TimeoutError:
            self._drop_wire(
                wire, rexc.TimeoutError(f"no reply within {wire.timeout} s")
            )
        except (rexc.RedisError, OSError) as exc:
            self._drop_wire(wire, exc)
        except BaseException as exc:  # pragma: no cover - a bug: fail loudly
            self._drop_wire(wire, rexc.ConnectionError(f"reader failed: {exc!r}"))
            raise

    def _resend(self, item: _Pending) -> None:
        self._pending.append(item)
        if not self._scheduled:
            self._scheduled = True
            loop = asyncio.get_running_loop()
            if self._wire is not None:
                loop.call_soon(self._flush)
            else:
                self._sender = loop.create_task(self._send_all())

    async def _failure(self, exc: BaseException, what: str) -> BackendError:
        if is_read_only(exc) and self._client is not None:
            await _disconnect(self._client)
        return translated(exc, self.error_type, f"{self.kind} ({what})", self.url)

    async def _call(self, what: str, *args: Any) -> Any:
        """Run one command in the next pipelined write and return its raw reply."""
        future = self._enqueue(args)
        try:
            return await future
        except (rexc.RedisError, OSError) as exc:
            raise await self._failure(exc, what) from exc

    def _script_args(
        self, name: str, keys: Sequence[str], args: Sequence[Any]
    ) -> tuple[Any, ...]:
        return ("EVALSHA", self._shas[name], len(keys), *keys, *args)

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run the script ``name`` in the next pipelined write."""
        return await self._call(name, *self._script_args(name, keys, args))

    async def _call_many(
        self, what: str, commands: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        """Run ``commands`` in one write (or in the next, with others).

        Raises:
            The backend's error for the first command that failed, once every
            reply is in (the others have run).
        """
        futures = [self._enqueue(args) for args in commands]
        replies: list[Any] = []
        first: BaseException | None = None
        try:
            for future in futures:
                try:
                    replies.append(await future)
                except (rexc.RedisError, OSError) as exc:
                    replies.append(None)
                    if first is None:
                        first = exc
        except BaseException:
            # A cancelled caller: the sender still reads (and drops) every reply
            # in order, so the connection stays in step; nobody waits on these.
            for future in futures:
                future.cancel()
            raise
        if first is not None:
            raise await self._failure(first, what) from first
        return replies

    async def _send_all(self) -> None:
        """Write what is pending, read the replies, repeat until nothing waits."""
        cancels = cancel_count()
        try:
            while self._pending:
                if self._conn is None and await self._open_wire():
                    # Raced only by close(); from now on _flush writes.
                    raise_swallowed_cancel(cancels)
                    self._flush()
                    return
                batch, self._pending = self._pending, []
                await self._send(batch)
                # close() cancels this task; redis-py may have swallowed that.
                raise_swallowed_cancel(cancels)
        except BaseException as exc:
            # Cancelled by close() (or a bug): no caller may wait for ever.
            batch, self._pending = self._pending, []
            self._fail(batch, 0, rexc.ConnectionError(f"not sent: {exc!r}"))
            raise
        finally:
            if self._sender is asyncio.current_task():
                self._sender = None
            if self._wire is None or not self._pending:
                self._scheduled = False

    async def _open_wire(self) -> bool:
        """Take a pooled connection; speak to it directly when hiredis can.

        Returns True when the wire is up. A failure to connect fails what is
        pending (the caller sees the error) and returns False with nothing left.
        """
        pool: Any = self.client.connection_pool
        try:
            conn = await pool.get_connection()
        except (rexc.RedisError, OSError) as exc:
            batch, self._pending = self._pending, []
            self._fail(batch, 0, exc)
            return False
        self._conn = conn
        if not _Wire.usable(conn):
            return False
        wire = _Wire(conn, self.settings.socket_timeout)
        wire.reader = asyncio.get_running_loop().create_task(self._read_replies(wire))
        self._wire = wire
        return True

    @staticmethod
    def _fail(batch: list[_Pending], start: int, exc: BaseException) -> None:
        for _, future in batch[start:]:
            if not future.done():
                future.set_exception(exc)

    async def _send(self, batch: list[_Pending]) -> None:
        """One round trip for ``batch``, never sent twice.

        A batch whose connection fails is failed, not sent again: the server may
        have run its commands before the reply was lost, and a compare-and-set
        run twice would report that it did not land. (redis-py PINGs a
        connection idle past ``health_check_interval`` before it writes, so a
        connection the server closed while idle is made again first.)
        """
        read = 0
        try:
            conn = self._conn
            if conn is None:
                pool: Any = self.client.connection_pool
                conn = await pool.get_connection()
                self._conn = conn
            await conn.send_packed_command(
                conn.pack_commands([args for args, _ in batch])
            )
            for args, future in batch:
                try:
                    reply = await conn.read_response()
                except rexc.ResponseError as exc:
                    reply = exc
                read += 1
                if future.done():
                    continue
                if isinstance(reply, rexc.NoScriptError) and args[0] == "EVALSHA":
                    # The server lost its scripts: EVAL runs and loads it.
                    body = self._bodies[args[1]]
                    self._pending.append((("EVAL", body, *args[2:]), future))
                elif isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
            return
        except (rexc.RedisError, OSError) as exc:
            # redis-py has dropped the socket; it connects again on next use.
            await self._drop_connection()
            self._fail(batch, read, exc)
            return
        except BaseException:
            await self._drop_connection()
            raise

    async def _drop_connection(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            await conn.disconnect(nowait=True)
        except Exception:  # pragma: no cover - best effort
            logger.debug("dropping the pipeline connection failed", exc_info=True)
