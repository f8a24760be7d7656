"""The pytest plugin, run the way task authors run it: pytest inside pytest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

EXAMPLE = Path(__file__).with_name("example_test_tasks.py")
README = Path(__file__).parents[2] / "README.md"
AUTO_MODE = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
"""


def test_plugin_example_task_tests_pass(
    pytester: pytest.Pytester, simulated_gpus: type[Any]
) -> None:
    """The README example (run_task, fixtures, FakeClock, SimulatedGPUs) passes."""
    readme = README.read_text()
    start = readme.index("```python\nfrom __future__ import annotations") + 10
    shown = readme[start : readme.index("```", start)]
    example = EXAMPLE.read_text()
    assert shown == example[example.index("from __future__") :]
    pytester.makeini(AUTO_MODE)
    pytester.makepyfile(test_example=shown)

    result = pytester.runpytest("-p", "no:cacheprovider")

    result.assert_outcomes(passed=7)


def test_plugin_broken_runner_failure_says_what_is_wrong(
    pytester: pytest.Pytester,
) -> None:
    """A runner misusing the API fails its test with the mistake and its line."""
    pytester.makeini(AUTO_MODE)
    pytester.makepyfile(
        test_broken="""
        from backgrounder import Stage
        from backgrounder_testing import run_task

        class Resize:
            async def execute(self, job, ctx):
                await ctx.progress(10, Stage.fetch)
                await ctx.progress(150, Stage.write)
                return {"done": True}

        class Upload:
            async def execute(self, job, ctx):
                ctx.progress(50, "upload")
                return {1, 2}

        class Crash:
            async def execute(self, job, ctx):
                raise KeyError("width")

        async def test_resize():
            result = await run_task(Resize())
            assert result.status == "done"

        async def test_upload():
            await run_task(Upload())

        async def test_crash():
            result = await run_task(Crash())
            assert result.status == "done"
        """
    )

    result = pytester.runpytest()

    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(
        [
            "*TaskMistakeError: task 'Resize' misuses the runner API:",
            "*ctx.progress(150, Stage.write) was refused: percent must be between "
            "0 and 100 (got 150) (test_broken.py:7)",
            "*the runner's return value was refused: execute returned a set*",
            "*ctx.progress(50, 'upload') was called without await "
            "(test_broken.py:12), so it did nothing; add await",
            "*where the status is that of TaskResult(status='failed', "
            "error=\"execution_error in stage idle: KeyError: 'width' (raised at "
            'test_broken.py:17)"*',
            "*the runner raised KeyError: 'width'",
            '*test_broken.py:17 in execute: raise KeyError("width")',
        ],
        consecutive=False,
    )


def test_plugin_strict_mode_and_no_side_effects(pytester: pytest.Pytester) -> None:
    """Fixtures work in pytest-asyncio strict mode; unasked, they add nothing."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        test_strict="""
        import pytest
        from backgrounder import NoopRunner

        def test_plain(request):
            assert not [n for n in request.fixturenames if n.startswith("bg_")]

        @pytest.mark.asyncio
        async def test_manager(bg_manager):
            bg_manager.registry.add("noop", NoopRunner(sleep_ms=0))
            job = await bg_manager.submit("noop")
            assert job.status == "queued"
            assert bg_manager.worker.concurrency == 2
        """
    )

    result = pytester.runpytest("--strict-markers")

    result.assert_outcomes(passed=2)


def test_plugin_declares_options_and_marker(pytester: pytest.Pytester) -> None:
    """--help shows the backgrounder group; --markers shows its marker."""
    pytester.makeini(AUTO_MODE)
    help_text = pytester.runpytest("--help")
    help_text.stdout.fnmatch_lines(
        ["backgrounder job queue testing:", "*--bg-redis-url*"]
    )
    markers = pytester.runpytest("--markers")
    markers.stdout.fnmatch_lines(["@pytest.mark.backgrounder(**options):*"])


def test_plugin_marker_and_option_shape_the_manager(pytester: pytest.Pytester) -> None:
    """The marker's options and --bg-worker-count reach bg_manager."""
    pytester.makeini(AUTO_MODE)
    pytester.makepyfile(
        test_options="""
        import pytest

        @pytest.mark.backgrounder(lease_seconds=12, retry_backoff_seconds=60)
        async def test_marked(bg_manager, bg_clock):
            assert bg_manager.settings.lease_seconds == 12
            assert bg_manager.settings.retry_backoff_seconds == 60
            assert bg_manager.worker.concurrency == 3
            assert bg_manager.clock is bg_clock

        async def test_factory_shares_one_file(bg_manager_factory):
            first = await bg_manager_factory(worker_count=0)
            second = await bg_manager_factory(worker_count=1)
            first.registry.add("t", __import__("backgrounder").NoopRunner())
            job = await first.submit("t")
            assert (await second.get(job.id)).id == job.id
        """
    )

    result = pytester.runpytest("--bg-worker-count", "3")

    result.assert_outcomes(passed=2)


STAND_IN_SETUP = """
import contextlib

import pytest

import backgrounder.fastapi
from backgrounder import JobManager


def setup_backgrounder(app, *, registry, db_path, clock, **options):
    # A stand-in with the agreed signature, enough to exercise the fixtures.
    manager = JobManager(registry=registry, db_path=db_path, clock=clock, **options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with manager:
            yield

    app.router.lifespan_context = lifespan
    app.state.backgrounder = manager

    @app.post("/api/v1/jobs", status_code=202)
    async def submit(body: dict):
        job = await manager.submit(body["task"], body.get("params"))
        return job.model_dump(mode="json")

    @app.get("/api/v1/jobs/{job_id}")
    async def get(job_id: str):
        return (await manager.get(job_id)).model_dump(mode="json")


@pytest.fixture(autouse=True)
def _stand_in(monkeypatch):
    monkeypatch.setattr(
        backgrounder.fastapi, "setup_backgrounder", setup_backgrounder, raising=False
    )
"""


def test_plugin_bg_client_runs_the_app_lifespan(pytester: pytest.Pytester) -> None:
    """bg_client starts the app, serves requests, and shuts down past the grace."""
    pytester.makeini(AUTO_MODE)
    pytester.makeconftest(STAND_IN_SETUP)
    pytester.makepyfile(
        test_app="""
        import pytest
        from backgrounder import Stage

        class Slow:
            async def execute(self, job, ctx):
                await ctx.progress(1, Stage.fetch)
                await ctx.sleep(3600)

        @pytest.mark.backgrounder(shutdown_grace_seconds=30)
        async def test_submit_and_read(bg_client, bg_registry, bg_app):
            bg_registry.add("slow", Slow())
            manager = bg_app.state.backgrounder
            assert manager.started

            created = await bg_client.post("/api/v1/jobs", json={"task": "slow"})
            assert created.status_code == 202
            job_id = created.json()["id"]
            read = await bg_client.get(f"/api/v1/jobs/{job_id}")
            assert read.json()["task"] == "slow"
            # Left running: the teardown drains it on bg_clock, not for real.
        """
    )

    result = pytester.runpytest()

    result.assert_outcomes(passed=1)


def test_plugin_bg_app_names_what_is_missing(pytester: pytest.Pytester) -> None:
    """Without setup_backgrounder, bg_app fails with what it needs."""
    pytester.makeini(AUTO_MODE)
    pytester.makeconftest(
        """
        import pytest
        import backgrounder.fastapi

        @pytest.fixture(autouse=True)
        def _missing(monkeypatch):
            monkeypatch.delattr(
                backgrounder.fastapi, "setup_backgrounder", raising=False
            )
        """
    )
    pytester.makepyfile("def test_app(bg_app):\n    pass\n")

    result = pytester.runpytest()

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*bg_app needs FastAPI and backgrounder.fastapi.setup_backgrounder*"]
    )


def test_plugin_bg_client_with_the_real_setup(pytester: pytest.Pytester) -> None:
    """With the real setup_backgrounder, bg_client submits and reads a job."""
    import backgrounder.fastapi

    if not hasattr(backgrounder.fastapi, "setup_backgrounder"):
        pytest.skip(
            "backgrounder.fastapi.setup_backgrounder is not merged on this branch "
            "yet; test_plugin_bg_client_runs_the_app_lifespan covers the fixture"
        )
    pytester.makeini(AUTO_MODE)
    pytester.makepyfile(
        test_real="""
        from backgrounder import NoopRunner

        async def test_roundtrip(bg_client, bg_registry):
            bg_registry.add("noop", NoopRunner(sleep_ms=0))
            created = await bg_client.post("/api/v1/jobs", json={"task": "noop"})
            assert created.status_code == 202, created.text
            job_id = created.json()["id"]
            read = await bg_client.get(f"/api/v1/jobs/{job_id}")
            assert read.status_code == 200 and read.json()["task"] == "noop"
        """
    )

    result = pytester.runpytest()

    result.assert_outcomes(passed=1)
