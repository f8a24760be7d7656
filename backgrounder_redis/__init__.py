"""The Redis backend of backgrounder: RedisQueue and RedisStore.

Install with ``pip install 'backgrounder[redis]'``; the plugin registers the
``redis://`` and ``rediss://`` URL schemes for ``store=`` and ``queue=``. The
classes are imported on first use, so the plugin loads (and a SQLite-only
deployment runs) where redis-py is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backgrounder_redis._common import RedisSettings
    from backgrounder_redis.queue import RedisQueue
    from backgrounder_redis.store import RedisStore

__all__ = ["RedisQueue", "RedisSettings", "RedisStore"]

_HOMES = {
    "RedisQueue": "backgrounder_redis.queue",
    "RedisSettings": "backgrounder_redis._common",
    "RedisStore": "backgrounder_redis.store",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'backgrounder_redis' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
