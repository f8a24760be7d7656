"""Hook implementations that make ``redis://`` URLs work for store= and queue=."""

from __future__ import annotations

from backgrounder.errors import ConfigurationError
from backgrounder.hookspecs import hookimpl
from backgrounder.queue.base import JobQueue
from backgrounder.store.base import JobStore

__all__ = ["backgrounder_create_queue", "backgrounder_create_store"]

_SCHEMES = ("redis://", "rediss://")


@hookimpl
def backgrounder_create_store(url: str) -> JobStore | None:
    """Build a RedisStore for ``redis://`` and ``rediss://`` URLs (``?prefix=``)."""
    if not url.startswith(_SCHEMES):
        return None
    _require_redis(url)
    from backgrounder_redis.store import RedisStore

    return RedisStore(url)


@hookimpl
def backgrounder_create_queue(url: str) -> JobQueue | None:
    """Build a RedisQueue for ``redis://`` and ``rediss://`` URLs (``?prefix=``)."""
    if not url.startswith(_SCHEMES):
        return None
    _require_redis(url)
    from backgrounder_redis.queue import RedisQueue

    return RedisQueue(url)


def _require_redis(url: str) -> None:
    """Raise ConfigurationError naming the extra when redis-py is missing."""
    try:
        import redis.asyncio  # noqa: F401
    except ImportError as exc:
        scheme = url.split(":", 1)[0]
        raise ConfigurationError(
            f"{scheme}:// URLs need redis-py: pip install 'backgrounder[redis]'"
        ) from exc
