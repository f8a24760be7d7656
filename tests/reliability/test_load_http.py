"""Short HTTP load through uvicorn on a loopback port (bench/load_http.py).

Concurrent submits with repeated idempotency keys while workers run and cancels
arrive: no 5xx, no job lost or duplicated, no attempt run twice, every job
terminal at the end. On the SQLite file, and on the real Redis server (Redis
store and queue on a fresh key prefix) when BACKGROUNDER_REDIS_URL is set.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.integration.redis_tools import REDIS_URL, needs_redis, unique_prefix


def _load_bench() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "load_http.py"
    spec = importlib.util.spec_from_file_location("load_http", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_http"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "where",
    ["sqlite", pytest.param("redis", marks=[needs_redis, pytest.mark.redis])],
)
def test_http_load_loses_and_duplicates_nothing(tmp_path: Path, where: str) -> None:
    bench = _load_bench()
    redis = None
    if where == "redis":
        assert REDIS_URL
        redis = (REDIS_URL, unique_prefix())
    app, work = bench.build_app(tmp_path / "jobs.db", 4, redis)
    try:
        with bench.ServerThread(app) as server:
            report = asyncio.run(bench.run_load(server.url, work, 600, 32))
    finally:
        if redis is not None:
            asyncio.run(bench.delete_prefix(*redis))
    print(f"\nHTTP load ({where}):", report.line())
    assert report.server_errors == 0, report.status
    assert report.lost == 0
    assert report.duplicated_keys == 0
    assert report.attempts_run_twice == 0
    assert report.not_terminal == 0
    assert report.done_after_cancel == 0
    assert set(report.status) <= {200, 202, 409}, report.status
    assert len(report.accepted) == 600 - 200 + 200 // 3 + (1 if 200 % 3 else 0)
