"""bg_redis: fakeredis by default, a real server on request, keys cleaned up."""

from __future__ import annotations

from typing import Any

import pytest

REDIS_URL = "redis://127.0.0.1:6379/15"


async def test_bg_redis_gives_a_working_client(
    bg_redis: Any, bg_redis_prefix: str
) -> None:
    """The client stores and reads keys under the test's own prefix."""
    await bg_redis.set(f"{bg_redis_prefix}greeting", "hello")

    assert await bg_redis.get(f"{bg_redis_prefix}greeting") == b"hello"
    assert bg_redis_prefix.startswith("bgtest:") and bg_redis_prefix.endswith(":")


def _real_redis() -> Any:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis server at {REDIS_URL} ({exc}); start one to run this")
    return client


@pytest.mark.redis
def test_bg_redis_real_server_keys_are_deleted(pytester: pytest.Pytester) -> None:
    """With --bg-redis-url, keys under the prefix are gone after the test."""
    client = _real_redis()
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        test_keys="""
        from pathlib import Path

        async def test_write(bg_redis, bg_redis_prefix):
            await bg_redis.set(bg_redis_prefix + "a", "1")
            await bg_redis.hset(bg_redis_prefix + "h", "f", "v")
            assert await bg_redis.exists(bg_redis_prefix + "a")
            Path("prefix.txt").write_text(bg_redis_prefix)
        """
    )

    result = pytester.runpytest("--bg-redis-url", REDIS_URL)

    result.assert_outcomes(passed=1)
    prefix = (pytester.path / "prefix.txt").read_text()
    try:
        assert list(client.scan_iter(match=f"{prefix}*")) == []
    finally:
        client.close()
