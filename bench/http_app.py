"""The app that bench/run.py serves with uvicorn for the HTTP submit figure.

``POST /api/v1/jobs`` is backgrounder's submit route (SQLite store, memory queue,
no workers, so the figure is the submit path alone); ``POST /bare`` is a bare
FastAPI endpoint in the same server that returns a constant, the ceiling.
The database path comes from ``BENCH_DB``.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from backgrounder import NoopRunner, TaskRegistry
from backgrounder.fastapi import setup_backgrounder

registry = TaskRegistry()
registry.add("noop", NoopRunner(sleep_ms=0))

app = FastAPI()
setup_backgrounder(
    app,
    db_path=os.environ.get("BENCH_DB", "bench-http.db"),
    registry=registry,
    worker_count=0,
)


@app.post("/bare")
async def bare() -> dict[str, str]:
    """Return a constant: what the server itself costs per request."""
    return {"status": "ok"}
