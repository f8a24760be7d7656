"""Connection faults on real Redis servers this test starts itself (B30-B32).

Each test runs its own ``redis-server`` on a free loopback port, never the shared
one, so killing clients or stopping the server disturbs nobody else. Guarded by
BACKGROUNDER_REDIS_URL like every real-server test.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from backgrounder import JobManager, JobStatus, NoopRunner, TaskRegistry
from backgrounder.errors import BackendError
from backgrounder.models import Job
from backgrounder.tasks import RunContext
from backgrounder_redis import RedisQueue, RedisSettings, RedisStore
from tests.conftest import wait_for
from tests.integration.redis_tools import (
    RedisServer,
    needs_server_binary,
    redis_server,
    tcp_proxy,
)

pytestmark = [needs_server_binary, pytest.mark.redis]

FAST = RedisSettings(
    socket_timeout=1.5,
    socket_connect_timeout=1.0,
    health_check_interval=1.0,
    max_block_seconds=0.5,
)


class Hold:
    """Runs until canceled; tells the test when it started."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def execute(self, job: Job, ctx: RunContext) -> None:
        self.started.set()
        await ctx.sleep(120)


def make_registry() -> TaskRegistry:
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0, stages=1))
    registry.add("hold", Hold())
    return registry


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    with redis_server(tmp_path) as built:
        yield built


async def start_pair(
    store_url: str, worker_url: str | None = None, **worker_options: Any
) -> tuple[JobManager, JobManager]:
    """Start an API manager (no worker) and a worker manager; return both."""
    registry = make_registry()
    api = JobManager(
        store=store_url, queue=store_url, registry=registry, worker_count=0
    )
    await api.start()
    url = worker_url or store_url
    options: dict[str, Any] = {
        "worker_count": 2,
        "lease_seconds": 120,
        "poll_seconds": 0.5,
        "retry_backoff_seconds": 0.05,
    }
    options.update(worker_options)
    worker = JobManager(store=url, queue=url, registry=registry, **options)
    await worker.start()
    return api, worker


async def wait_healthy(manager: JobManager, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not (await manager.health())["ok"]:
            await asyncio.sleep(0.1)


async def wait_logged(
    caplog: pytest.LogCaptureFixture, text: str, timeout: float = 20.0
) -> None:
    async with asyncio.timeout(timeout):
        while not any(text in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.05)


async def admin(server: RedisServer) -> aioredis.Redis:
    return aioredis.Redis.from_url(server.url, decode_responses=True)


async def test_b30_client_kill_while_idle_then_work_resumes(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="backgrounder_redis")
    api, worker = await start_pair(server.url)
    try:
        hold = worker.registry.get("hold").runner  # type: ignore[union-attr]
        held = await api.submit("hold")
        async with asyncio.timeout(10):
            await hold.started.wait()
        client = await admin(server)
        try:
            killed = await client.client_kill_filter(_type="normal")
            killed += await client.client_kill_filter(_type="pubsub")
        finally:
            await client.aclose()
        assert killed >= 3
        job = await api.submit("noop")
        done = await wait_for(api, job.id, "done", timeout=10)
        assert done.attempt == 1
        # The cancel channel was subscribed again, so a cancel reaches the job
        # long before its next heartbeat (lease 120 s: every 40 s).
        await wait_logged(caplog, "made again")
        await api.cancel(held.id)
        canceled = await wait_for(api, held.id, "canceled", timeout=10)
        assert canceled.attempt == 1
        assert worker.worker.status()["ok"]
    finally:
        await worker.close(drain=False)
        await api.close()


async def test_b30_silent_network_is_noticed_and_work_resumes(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="backgrounder_redis")
    async with tcp_proxy(server.port) as proxy:
        registry = make_registry()
        api = JobManager(
            store=server.url, queue=server.url, registry=registry, worker_count=0
        )
        await api.start()
        worker = JobManager(
            store=RedisStore(proxy.url, settings=FAST),
            queue=RedisQueue(proxy.url, settings=FAST),
            registry=registry,
            worker_count=2,
            lease_seconds=3,
            poll_seconds=0.5,
        )
        await worker.start()
        try:
            first = await api.submit("noop")
            await wait_for(api, first.id, "done", timeout=10)
            before = proxy.connections
            proxy.blackhole()
            job = await api.submit("noop")
            # Socket timeouts (1.5 s) plus backoff bound the stall: well under 10 s.
            done = await wait_for(api, job.id, "done", timeout=10)
            assert done.status == JobStatus.done
            assert proxy.connections > before
            await wait_logged(caplog, "made again")
        finally:
            await worker.close(drain=False)
            await api.close()


async def test_b31_server_restart_worker_survives_and_cancel_still_arrives(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="backgrounder_redis")
    api, worker = await start_pair(server.url)
    try:
        hold = worker.registry.get("hold").runner  # type: ignore[union-attr]
        held = await api.submit("hold")
        async with asyncio.timeout(10):
            await hold.started.wait()
        queued = [await api.submit("noop") for _ in range(3)]
        await asyncio.to_thread(server.stop, save=True)
        report = await api.health()
        assert not report["ok"] and not report["store"]["ok"]
        assert "unreachable" in report["store"]["error"]
        with pytest.raises(BackendError, match="unreachable"):
            await api.submit("noop")
        await asyncio.to_thread(server.start)
        await wait_healthy(api)
        await wait_healthy(worker)
        for job in queued:
            await wait_for(api, job.id, "done", timeout=30)
        fresh = await api.submit("noop")
        await wait_for(api, fresh.id, "done", timeout=30)
        await wait_logged(caplog, "made again")
        await api.cancel(held.id)
        canceled = await wait_for(api, held.id, "canceled", timeout=10)
        assert canceled.attempt == 1
        assert [e.code for e in canceled.errors] == ["canceled"]
        assert worker.worker.status()["alive"]
    finally:
        await worker.close(drain=False)
        await api.close()


async def test_b32_read_only_replica_gives_a_clear_error_then_recovers(
    server: RedisServer, tmp_path: Path
) -> None:
    with redis_server(tmp_path / "b") as other:
        api, worker = await start_pair(server.url)
        client = await admin(server)
        try:
            await client.replicaof("127.0.0.1", other.port)
            with pytest.raises(BackendError, match="read-only"):
                await api.submit("noop")
            report = await api.health()
            assert not report["ok"] and "read-only" in report["store"]["error"]
            await client.replicaof("NO", "ONE")
            await wait_healthy(api)
            job = await api.submit("noop")
            done = await wait_for(api, job.id, "done", timeout=30)
            assert done.attempt == 1
        finally:
            await client.aclose()
            await worker.close(drain=False)
            await api.close()
