"""The demo app: the corpus task and a no-op task on the embedded default.

Run it with ``uvicorn examples.app:app`` (jobs go to ``backgrounder-demo.db``
in the current folder) or through ``backgrounder demo``.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from backgrounder import NoopRunner, TaskRegistry, setup_backgrounder
from examples.corpus import CorpusTask

__all__ = ["app", "create_app", "create_registry"]


def create_registry(output_dir: str | Path = "reports") -> TaskRegistry:
    """Return the demo's tasks: ``corpus``, ``noop`` (1 s) and ``walk`` (50 s).

    ``walk`` walks the stages slowly, so there is time to cancel it by hand.
    """
    registry = TaskRegistry()
    registry.add("corpus", CorpusTask(default_output_dir=str(output_dir)))
    registry.add("noop", NoopRunner(sleep_ms=200))
    registry.add("walk", NoopRunner(sleep_ms=10_000))
    return registry


def create_app(
    db_path: str | Path = "backgrounder-demo.db",
    output_dir: str | Path = "reports",
    worker_count: int = 4,
    **options: Any,
) -> FastAPI:
    """Return the demo app, its jobs in the SQLite file ``db_path``.

    The dashboard is on (``/api/v1/jobs/_dashboard``), and so are the metrics
    (``/api/v1/jobs/_metrics``) when prometheus-client is installed.
    ``options`` go to setup_backgrounder (``shutdown_grace_seconds``, ...).
    """
    options.setdefault("dashboard", True)
    options.setdefault("metrics", find_spec("prometheus_client") is not None)
    app = FastAPI(title="backgrounder demo")
    setup_backgrounder(
        app,
        db_path=db_path,
        registry=create_registry(output_dir),
        worker_count=worker_count,
        **options,
    )
    return app


app = create_app()
