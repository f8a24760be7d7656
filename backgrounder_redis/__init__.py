"""The Redis backend of backgrounder: RedisQueue and RedisStore."""

from __future__ import annotations

__all__: list[str] = []
