"""The pytest plugin of backgrounder_testing (registered through pytest11).

Fixtures, all function-scoped and opt-in (nothing here is autouse):

- ``bg_clock``: a FakeClock.
- ``bg_registry``: a TaskRegistry shared by ``bg_manager`` and ``bg_app``.
- ``bg_gpus``: a factory of SimulatedGPUs.
- ``bg_manager_factory`` / ``bg_manager``: started JobManagers on a temporary
  SQLite file and the memory queue, driven by ``bg_clock``.
- ``bg_app`` / ``bg_client``: a FastAPI app with backgrounder, and an httpx client
  talking to it with its lifespan running.
- ``bg_redis``: a Redis client (fakeredis, or a real server) under a unique key
  prefix (``bg_redis_prefix``).
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

if TYPE_CHECKING:
    from fastapi import FastAPI
    from httpx import AsyncClient

    from backgrounder import JobManager, TaskRegistry
    from backgrounder_testing.clock import FakeClock

__all__ = [
    "bg_app",
    "bg_client",
    "bg_clock",
    "bg_gpus",
    "bg_manager",
    "bg_manager_factory",
    "bg_redis",
    "bg_redis_prefix",
    "bg_registry",
]

ManagerFactory = Callable[..., Awaitable["JobManager"]]

#: Real seconds a fixture waits for a manager or app to close before failing.
CLOSE_GUARD_SECONDS = 30.0


# ---------------------------------------------------------------- configuration


def pytest_addoption(parser: pytest.Parser) -> None:
    """Declare the "backgrounder" option group and its ini settings."""
    group = parser.getgroup("backgrounder", "backgrounder job queue testing")
    group.addoption(
        "--bg-redis-url",
        dest="bg_redis_url",
        default=None,
        help="Redis server for bg_redis (default: ini bg_redis_url, then "
        "$BACKGROUNDER_REDIS_URL, else fakeredis).",
    )
    group.addoption(
        "--bg-worker-count",
        dest="bg_worker_count",
        type=int,
        default=None,
        help="Workers of bg_manager and bg_app (default: ini bg_worker_count, 2).",
    )
    parser.addini(
        "bg_redis_url",
        "Redis server for bg_redis; empty means $BACKGROUNDER_REDIS_URL or fakeredis.",
        default="",
    )
    parser.addini(
        "bg_worker_count", "Workers of bg_manager and bg_app (default 2).", default="2"
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the plugin's marker."""
    config.addinivalue_line(
        "markers",
        "backgrounder(**options): JobManager options for bg_manager, "
        "bg_manager_factory and bg_app, e.g. lease_seconds=10, worker_count=1",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Forget the results of run_task in earlier tests."""
    harness = sys.modules.get("backgrounder_testing.harness")
    if harness is not None:
        harness.forget_results()


def pytest_assertrepr_compare(
    config: pytest.Config, op: str, left: object, right: object
) -> list[str] | None:
    """Explain a failed ``assert result.status == "done"`` with the result's error.

    pytest shows only a diff of the two status strings; this adds the result of
    run_task whose status it was, with its error and where the runner raised it.
    """
    harness = sys.modules.get("backgrounder_testing.harness")
    if harness is None or op != "==":
        return None
    from backgrounder.models import JobStatus

    status = left if isinstance(left, JobStatus) else right
    if not isinstance(status, JobStatus):
        return None
    result = harness.recent_result(status)
    if result is None:
        return None
    lines = [f"{left!r} == {right!r}", f"where the status is that of {result!r}"]
    if result.exception is not None:
        lines += harness.runner_frames(result.exception)
    return lines


def _worker_count(config: pytest.Config) -> int:
    value = config.getoption("bg_worker_count")
    if value is None:
        value = int(str(config.getini("bg_worker_count")))
    return int(value)


def _marker_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers("backgrounder"))):
        if marker.args:
            raise pytest.UsageError(
                "@pytest.mark.backgrounder takes keyword options only, e.g. "
                f"@pytest.mark.backgrounder(lease_seconds=10) (got {marker.args!r})"
            )
        options.update(marker.kwargs)
    return options


# ---------------------------------------------------------------- time and GPUs


@pytest.fixture
def bg_clock() -> FakeClock:
    """A FakeClock: time moves only when the test moves it.

    Offers ``now()`` (aware UTC), ``monotonic()``, ``await sleep(s)``,
    ``advance(seconds)`` (wakes sleepers in deadline order; never backwards),
    ``advance_to_next()``, ``jump_wall(seconds)`` (wall time alone),
    ``await settle()``, ``await advance_async(seconds)``, ``sleepers`` and
    ``next_deadline()``. ``bg_manager`` and ``bg_app`` run on it.
    """
    from backgrounder_testing.clock import FakeClock

    return FakeClock()


@pytest.fixture
def bg_gpus() -> Callable[..., Any]:
    """A factory of SimulatedGPUs: ``gpus = bg_gpus([24_000, 24_000])``.

    Call it with ``memory_mb`` (one total per device) and optional ``names``.
    Each SimulatedGPUs is a resource-probe plugin: pass it with
    ``bg_manager_factory(plugins=[gpus])`` or ``run_task(..., gpus=gpus)``, and
    change what a device already uses with ``gpus.set_used(index, mb)``.
    """
    try:
        from backgrounder_testing.gpus import (
            SimulatedGPUs,
        )
    except ImportError as exc:  # pragma: no cover - only before gpus.py exists
        raise pytest.UsageError(
            f"bg_gpus needs backgrounder_testing.gpus.SimulatedGPUs: {exc}"
        ) from exc

    def make(memory_mb: list[int], names: list[str] | None = None) -> Any:
        return SimulatedGPUs(memory_mb, names)

    return make


# ---------------------------------------------------------------- managers


@pytest.fixture
def bg_registry() -> TaskRegistry:
    """An empty TaskRegistry that ``bg_manager`` and ``bg_app`` use.

    Offers ``add(name, runner, timeout_seconds=..., max_retries=...,
    resources=..., non_retryable=...)``, ``get(name)`` and ``names()``. Runners
    may be added before or after the manager starts.
    """
    from backgrounder import TaskRegistry

    return TaskRegistry()


@pytest_asyncio.fixture
async def bg_manager_factory(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    bg_clock: FakeClock,
    bg_registry: TaskRegistry,
) -> AsyncIterator[ManagerFactory]:
    """A factory of started JobManagers, all closed at teardown.

    ``manager = await bg_manager_factory(**options)`` takes every JobManager
    keyword: ``registry`` (default ``bg_registry``), ``clock`` (default
    ``bg_clock``), ``db_path`` (default one temporary SQLite file shared by
    every manager the factory builds, so a second manager sees the first's
    jobs), ``plugins``, ``resource_limits``, ``worker_id`` and ManagerSettings
    options (``worker_count`` default 2, ``lease_seconds``,
    ``retry_backoff_seconds``...). Options of ``@pytest.mark.backgrounder``
    apply first. Managers close without draining, so a job left running does
    not hold the teardown.
    """
    from backgrounder import JobManager

    managers: list[JobManager] = []
    defaults: dict[str, Any] = {
        "registry": bg_registry,
        "clock": bg_clock,
        "worker_count": _worker_count(request.config),
    }
    defaults.update(_marker_options(request))

    async def factory(**options: Any) -> JobManager:
        settings = {**defaults, **options}
        if "store" not in settings:
            settings.setdefault("db_path", tmp_path / "backgrounder.db")
        manager = JobManager(**settings)
        await manager.start()
        managers.append(manager)
        return manager

    yield factory
    for manager in reversed(managers):
        await _close_guarded(manager.close(drain=False), f"{manager!r}")


@pytest_asyncio.fixture
async def bg_manager(bg_manager_factory: ManagerFactory) -> JobManager:
    """A started JobManager: 2 in-process workers, temporary SQLite, memory queue.

    It runs on ``bg_clock``; add runners with ``bg_manager.registry.add(...)``.
    Offers ``submit``, ``get``, ``list``, ``cancel``, ``retry``, ``assets``,
    ``events(job_id)``, ``health()``, ``registry``, ``clock``, ``worker``
    (``worker.abandon()`` simulates a crash). Closed at teardown.
    """
    return await bg_manager_factory()


# ---------------------------------------------------------------- HTTP


@pytest.fixture
def bg_app(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    bg_clock: FakeClock,
    bg_registry: TaskRegistry,
) -> FastAPI:
    """A FastAPI app with backgrounder set up, not started (``bg_client`` starts it).

    Built by ``setup_backgrounder(app, registry=bg_registry, db_path=<tmp>,
    clock=bg_clock, worker_count=2, **marker options)``; routes live under
    ``/api/v1``. Add runners to ``bg_registry``.
    """
    try:
        from fastapi import FastAPI

        from backgrounder.fastapi import (  # type: ignore[attr-defined,unused-ignore]
            setup_backgrounder,
        )
    except ImportError as exc:
        raise pytest.UsageError(
            "bg_app needs FastAPI and backgrounder.fastapi.setup_backgrounder, "
            f"which cannot be imported here: {exc}"
        ) from exc
    app = FastAPI()
    options: dict[str, Any] = {"worker_count": _worker_count(request.config)}
    options.update(_marker_options(request))
    setup_backgrounder(
        app,
        registry=bg_registry,
        db_path=tmp_path / "backgrounder-app.db",
        clock=bg_clock,
        **options,
    )
    return app


@pytest_asyncio.fixture
async def bg_client(bg_app: FastAPI, bg_clock: FakeClock) -> AsyncIterator[AsyncClient]:
    """An httpx.AsyncClient for ``bg_app``, with the app's lifespan running.

    The base URL is ``http://testserver``; call ``await bg_client.post(
    "/api/v1/jobs", json={...})``. At teardown the app shuts down while
    ``bg_clock`` is moved along, so shutdown graces pass at once.
    """
    import httpx

    from backgrounder_testing._lifespan import lifespan

    async def pump_clock() -> None:
        while True:
            await bg_clock.settle()
            if bg_clock.advance_to_next() is None:
                # Nothing sleeps on the clock: the shutdown waits on I/O.
                await asyncio.sleep(0.005)

    transport = httpx.ASGITransport(app=bg_app)
    context = lifespan(bg_app, on_shutdown=pump_clock)
    await context.__aenter__()
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver"
        ) as client:
            yield client
    finally:
        await _close_guarded(context.__aexit__(None, None, None), "the bg_app")


# ---------------------------------------------------------------- Redis


@pytest.fixture
def bg_redis_prefix() -> str:
    """A key prefix unique to this test, such as ``bgtest:1a2b3c4d:``."""
    return f"bgtest:{uuid.uuid4().hex[:8]}:"


@pytest_asyncio.fixture
async def bg_redis(
    request: pytest.FixtureRequest, bg_redis_prefix: str
) -> AsyncIterator[Any]:
    """An async Redis client: fakeredis, or a real server when one is configured.

    The server is ``--bg-redis-url``, the ini ``bg_redis_url`` or
    ``$BACKGROUNDER_REDIS_URL``; with none, an in-memory fakeredis server of this
    test alone. Use ``bg_redis_prefix`` for every key: at teardown the keys
    under it are deleted and the client is closed. The client is a
    ``redis.asyncio.Redis`` (bytes replies) with its usual commands.
    """
    url = (
        request.config.getoption("bg_redis_url")
        or str(request.config.getini("bg_redis_url"))
        or os.environ.get("BACKGROUNDER_REDIS_URL", "")
    )
    if url:
        from redis.asyncio import Redis

        client = Redis.from_url(url)
        try:
            await client.ping()
        except Exception as exc:
            await client.aclose()
            raise pytest.UsageError(
                f"bg_redis cannot reach the Redis server at {url!r}: {exc}; start "
                "it, or unset BACKGROUNDER_REDIS_URL to use fakeredis"
            ) from exc
    else:
        import fakeredis

        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{bg_redis_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


# ---------------------------------------------------------------- helpers


async def _close_guarded(closing: Awaitable[Any], what: str) -> None:
    """Await a close, failing loudly (not hanging) if it never ends."""
    try:
        async with asyncio.timeout(CLOSE_GUARD_SECONDS):
            await closing
    except TimeoutError:
        raise AssertionError(
            f"{what} did not close within {CLOSE_GUARD_SECONDS:.0f} s; a runner "
            "that ignores cancellation (a sync runner in a thread, or one that "
            "swallows CancelledError) may be holding it"
        ) from None
