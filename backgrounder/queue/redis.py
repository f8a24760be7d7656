"""The Redis queue, re-exported from the backgrounder_redis plugin."""

from __future__ import annotations

try:
    from backgrounder_redis import RedisQueue, RedisSettings, RedisStore
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the Redis backend needs the 'redis' extra: pip install 'backgrounder[redis]'"
    ) from exc

__all__ = ["RedisQueue", "RedisSettings", "RedisStore"]
