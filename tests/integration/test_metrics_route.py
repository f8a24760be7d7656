"""The Prometheus metrics route: ``setup_backgrounder(..., metrics=True)``."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from fastapi import Depends, FastAPI, Header, HTTPException

from backgrounder import Job, RunContext, setup_backgrounder
from backgrounder.errors import ConfigurationError
from backgrounder.metrics import PrometheusMetrics
from tests.integration.test_http import (
    API,
    Gate,
    make_app,
    make_registry,
    serve,
    wait_status,
)


class Sleeper:
    """Sleep until canceled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def execute(self, job: Job, ctx: RunContext) -> None:
        self.started.set()
        await ctx.sleep(3600)


def samples(text: str) -> dict[str, float]:
    """Return the exposition's samples by name and labels."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


async def test_metrics_route_counts_jobs_by_task_and_status(tmp_path: Path) -> None:
    """After done, failed and canceled jobs the scrape shows each with its labels."""
    sleeper = Sleeper()
    app, _ = make_app(
        tmp_path, make_registry(sleeps=sleeper), metrics=True, worker_count=2
    )
    async with serve(app) as client:
        for _ in range(2):
            job = (await client.post(API, json={"task": "noop"})).json()
            await wait_status(client, job["id"], "done")
        boom = (await client.post(API, json={"task": "boom"})).json()
        await wait_status(client, boom["id"], "failed")
        sleeps = (await client.post(API, json={"task": "sleeps"})).json()
        await asyncio.wait_for(sleeper.started.wait(), 10)
        assert (await client.post(f"{API}/{sleeps['id']}/cancel")).status_code == 200
        await wait_status(client, sleeps["id"], "canceled")

        response = await client.get(f"{API}/_metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    got = samples(response.text)
    assert got['backgrounder_jobs_submitted_total{task="noop"}'] == 2
    assert got['backgrounder_jobs_submitted_total{task="boom"}'] == 1
    assert got['backgrounder_jobs_started_total{task="sleeps"}'] == 1
    finished = "backgrounder_jobs_finished_total"
    assert got[f'{finished}{{status="done",task="noop"}}'] == 2
    assert got[f'{finished}{{status="failed",task="boom"}}'] == 1
    assert got[f'{finished}{{status="canceled",task="sleeps"}}'] == 1
    duration = "backgrounder_job_duration_seconds"
    assert got[f'{duration}_count{{status="done",task="noop"}}'] == 2
    assert got[f'{duration}_bucket{{le="+Inf",status="done",task="noop"}}'] == 2
    assert got[f'{duration}_count{{status="failed",task="boom"}}'] == 1
    assert got[f'{duration}_count{{status="canceled",task="sleeps"}}'] == 1
    assert got[f'{duration}_sum{{status="done",task="noop"}}'] >= 0
    assert got['backgrounder_job_wait_seconds_count{task="noop"}'] == 2
    assert got['backgrounder_job_wait_seconds_count{task="sleeps"}'] == 1
    assert got['backgrounder_jobs{status="done"}'] == 2
    assert got['backgrounder_jobs{status="failed"}'] == 1
    assert got['backgrounder_jobs{status="canceled"}'] == 1
    assert got["backgrounder_queue_depth"] == 0
    assert got["backgrounder_running_jobs"] == 0
    assert 'backgrounder_reserved_mb{resource="memory"}' in got


async def test_metrics_route_shows_queue_depth_and_running_jobs(
    tmp_path: Path,
) -> None:
    """While one job runs and one waits, the gauges say so."""
    gate = Gate()
    app, _ = make_app(tmp_path, make_registry(gate=gate), metrics=True, worker_count=1)
    async with serve(app) as client:
        running = (await client.post(API, json={"task": "gate"})).json()
        await asyncio.wait_for(gate.started.wait(), 10)
        waiting = (await client.post(API, json={"task": "noop"})).json()

        got = samples((await client.get(f"{API}/_metrics")).text)
        gate.release.set()
        await wait_status(client, running["id"], "done")
        await wait_status(client, waiting["id"], "done")

    assert got["backgrounder_running_jobs"] == 1
    assert got["backgrounder_queue_depth"] == 1
    assert got['backgrounder_jobs{status="running"}'] == 1
    assert got['backgrounder_jobs{status="queued"}'] == 1
    assert got['backgrounder_jobs_started_total{task="gate"}'] == 1


async def test_metrics_route_uses_the_metrics_object_given(tmp_path: Path) -> None:
    """An app's own PrometheusMetrics is the one registered and served."""
    metrics = PrometheusMetrics(namespace="myapp")
    app, _ = make_app(tmp_path, metrics=metrics)
    async with serve(app) as client:
        job = (await client.post(API, json={"task": "noop"})).json()
        await wait_status(client, job["id"], "done")
        text = (await client.get(f"{API}/_metrics")).text

    assert app.state.backgrounder_metrics is metrics
    assert samples(text)['myapp_jobs_finished_total{status="done",task="noop"}'] == 1


async def test_metrics_route_is_off_by_default(tmp_path: Path) -> None:
    """Without metrics=True there is no metrics route: the path is no job (404)."""
    app, _ = make_app(tmp_path)
    async with serve(app) as client:
        response = await client.get(f"{API}/_metrics")
    assert response.status_code == 404


async def test_metrics_route_is_behind_the_api_dependencies(tmp_path: Path) -> None:
    """The route runs the same dependencies (auth) as every API route."""

    def token(x_token: str | None = Header(None)) -> None:
        if x_token != "s3cret":
            raise HTTPException(status_code=401, detail="token required")

    app, _ = make_app(tmp_path, metrics=True, dependencies=[Depends(token)])
    async with serve(app) as client:
        refused = await client.get(f"{API}/_metrics")
        allowed = await client.get(f"{API}/_metrics", headers={"X-Token": "s3cret"})
    assert refused.status_code == 401
    assert allowed.status_code == 200


def test_metrics_without_prometheus_client_fail_setup_with_the_remedy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """metrics=True without prometheus-client says which extra to install."""
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'backgrounder\[metrics"):
        setup_backgrounder(FastAPI(), db_path=tmp_path / "jobs.db", metrics=True)
