"""The Redis backend of backgrounder: RedisQueue and RedisStore.

Install with ``pip install 'backgrounder[redis]'``; the plugin registers the
``redis://`` and ``rediss://`` URL schemes for ``store=`` and ``queue=``.
"""

from __future__ import annotations

from backgrounder_redis._common import RedisSettings
from backgrounder_redis.queue import RedisQueue
from backgrounder_redis.store import RedisStore

__all__ = ["RedisQueue", "RedisSettings", "RedisStore"]
