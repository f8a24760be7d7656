"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis + hypothesis).

An app built with ``setup_backgrounder`` (SQLite temp file, or Redis store and
queue on the server BACKGROUNDER_REDIS_URL names; two workers, a few tasks) runs
with its lifespan started; schemathesis generates requests for every operation
of the schema (``POST /jobs`` included: its JSON body is documented through
``openapi_extra``, so the generator sees it) and a second strategy sends bodies
that name the registered tasks, so the submit path past validation is exercised
too. After every response: no 5xx; a 4xx body is JSON with a non-empty
``detail`` string; 2xx bodies conform to the documented response schema. After
the run the store is consistent: every listed job is readable by ``GET``, no id
is listed twice, and counts by status add up.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backgrounder import Job, NoopRunner, RunContext, TaskRegistry
from backgrounder.fastapi import setup_backgrounder
from tests.integration.redis_tools import (
    REDIS_URL,
    delete_prefix,
    needs_redis,
    unique_prefix,
    with_prefix,
)

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis not installed")
from schemathesis.generation.modes import GenerationMode  # noqa: E402


def _import_all_of_schemathesis() -> None:
    """Import schemathesis's modules now, at collection.

    It imports many lazily; pytest rewrites them (schemathesis is a pytest
    plugin) with ``ast.parse``, and on CPython 3.11 that can fail with
    "AST constructor recursion depth mismatch" once an earlier test has caught
    a RecursionError (the deep-params cases do).
    """
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(schemathesis.__path__, "schemathesis."):
        try:
            importlib.import_module(info.name)
        except Exception:  # optional extras (graphql, django...) may be absent
            continue


_import_all_of_schemathesis()
from schemathesis.python import asgi as st_asgi  # noqa: E402

API = "/api/v1/jobs"
TASKS = ("noop", "boom", "echo")


class Boom:
    """A runner that always raises."""

    async def execute(self, job: Job, ctx: RunContext) -> None:
        raise RuntimeError("boom")


class Echo:
    """A runner that returns its params as the job's output."""

    async def execute(self, job: Job, ctx: RunContext) -> dict[str, Any]:
        return {"params": job.params}


def build_app(db: Path, redis_prefix: str | None = None) -> FastAPI:
    """The fuzzed app on the SQLite file ``db``, or on Redis under ``redis_prefix``."""
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0, stages=2))
    registry.add("boom", Boom())
    registry.add("echo", Echo())
    app = FastAPI(title="fuzzed")
    where: dict[str, Any] = {"db_path": db}
    if redis_prefix is not None:
        assert REDIS_URL
        spec = with_prefix(REDIS_URL, redis_prefix)
        where = {"store": spec, "queue": spec}
    setup_backgrounder(app, registry=registry, worker_count=2, **where)
    return app


def check_response(response: Any, counts: Counter[str]) -> None:
    status = response.status_code
    counts[f"{status // 100}xx"] += 1
    assert status < 500, f"{status} {response.text[:500]}"
    if 400 <= status < 500:
        body = response.json()
        assert isinstance(body, dict), body
        detail = body.get("detail")
        assert isinstance(detail, str) and detail.strip(), body


def json_values() -> st.SearchStrategy[Any]:
    leaves = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
    )
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )


def submit_bodies() -> st.SearchStrategy[dict[str, Any]]:
    """Bodies naming a registered task, with fields drawn in and out of range."""
    optional = {
        "params": st.dictionaries(st.text(max_size=8), json_values(), max_size=4)
        | json_values(),
        "priority": st.integers(-20, 20) | json_values(),
        "max_retries": st.integers(-2, 5) | json_values(),
        "timeout_seconds": st.floats(-5, 10**7, allow_nan=False) | st.none(),
        "idempotency_key": st.sampled_from(["k1", "k2", "k3"]) | st.text(max_size=300),
        "resources": st.fixed_dictionaries(
            {},
            optional={
                # The client cannot encode Infinity as JSON at all; NaN and
                # Infinity literals in a raw body are test_http.py's case.
                "cpu": st.integers(-2, 10**6)
                | st.floats(allow_nan=False, allow_infinity=False),
                "ram_mb": st.integers(-2, 10**9),
                "gpus": st.integers(-2, 64),
                "vram_mb": st.integers(-2, 10**9),
            },
        )
        | json_values(),
        "surprise": json_values(),
    }
    return st.fixed_dictionaries(
        {"task": st.sampled_from(TASKS) | st.text(max_size=10)}, optional=optional
    )


def run_fuzz(
    tmp_path: Path, max_examples: int, redis_prefix: str | None = None
) -> Counter[str]:
    app = build_app(tmp_path / "jobs.db", redis_prefix)
    counts: Counter[str] = Counter()
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        labels = {op.label for op in operations}
        # The submit route reads its body as a stream: it must still be fuzzed.
        assert f"POST {API}" in labels, labels
        client = st_asgi.get_client(app)
        with client:
            for operation in operations:
                if operation.path.endswith("/events"):
                    # An event stream of a live job ends only when it ends;
                    # its errors are fuzzed through the other job routes.
                    continue
                fuzz_operation(operation, client, counts, max_examples)
            fuzz_submits(client, counts, max_examples * 3)
            check_store(client)
    finally:
        st_asgi.shutdown_lifespans()
    print(
        f"\nHTTP fuzz ({'redis' if redis_prefix else 'sqlite'}): "
        f"{sum(v for k, v in counts.items() if k.endswith('xx'))} "
        f"requests, {dict(counts)}"
    )
    return counts


def fuzz_operation(
    operation: Any, client: Any, counts: Counter[str], max_examples: int
) -> None:
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=case_strategy(operation))
    def fuzz(case: Any) -> None:
        response = case.call(session=client)
        counts[operation.label] += 1
        check_response(response, counts)
        if 200 <= response.status_code < 300:
            case.operation.validate_response(response, case=case)

    fuzz()


def case_strategy(operation: Any) -> st.SearchStrategy[Any]:
    """Valid requests and, where the schema allows any, invalid ones."""
    strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
    try:
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
    except Exception:  # an operation with nothing to make invalid
        pass
    return st.one_of(strategies)


def fuzz_submits(client: Any, counts: Counter[str], max_examples: int) -> None:
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        body=submit_bodies(),
        header=st.none() | st.sampled_from(["k1", "k4"]),
        then=st.lists(st.sampled_from(["cancel", "retry", "assets"]), max_size=3),
    )
    def fuzz(body: dict[str, Any], header: str | None, then: list[str]) -> None:
        headers = {"Idempotency-Key": header} if header else {}
        response = client.post(API, json=body, headers=headers)
        counts["POST /jobs (task bodies)"] += 1
        check_response(response, counts)
        if response.status_code in (200, 202):
            counts["accepted"] += 1
            job = response.json()
            assert job["task"] == body["task"]
            assert client.get(f"{API}/{job['id']}").status_code == 200
            for action in then:
                method = client.get if action == "assets" else client.post
                after = method(f"{API}/{job['id']}/{action}")
                counts[f"{action} on a submitted job"] += 1
                check_response(after, counts)

    fuzz()


def list_all(client: Any, **query: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 200, **query}
        if cursor:
            params["cursor"] = cursor
        page = client.get(API, params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        items += body["items"]
        cursor = body.get("next_cursor")
        if not cursor:
            return items


def check_store(client: Any) -> None:
    """Every job ends; every listed job readable; counts by status add up."""
    deadline = time.monotonic() + 30
    while list_all(client, status="queued") or list_all(client, status="running"):
        # Polls the API until the workers finish what the fuzzer submitted.
        assert time.monotonic() < deadline, "jobs still unfinished after 30 s"
        time.sleep(0.05)
    jobs = list_all(client)
    ids = [job["id"] for job in jobs]
    assert len(ids) == len(set(ids)), "a job is listed twice"
    by_status: Counter[str] = Counter()
    for job_id in ids:
        got = client.get(f"{API}/{job_id}")
        assert got.status_code == 200, got.text
        by_status[got.json()["status"]] += 1
    for status in ("queued", "running", "done", "failed", "canceled"):
        listed = {job["id"] for job in list_all(client, status=status)}
        assert len(listed) == by_status[status], status
    assert sum(by_status.values()) == len(ids)
    health = client.get(f"{API}/_health")
    assert health.status_code == 200, health.text


@pytest.mark.parametrize(
    "where",
    ["sqlite", pytest.param("redis", marks=[needs_redis, pytest.mark.redis])],
)
def test_fuzz_http_api_from_openapi(tmp_path: Path, where: str) -> None:
    """On the SQLite file, and on the real Redis server when the URL is set."""
    examples = int(os.environ.get("FUZZ_EXAMPLES", 40))
    if where == "sqlite":
        counts = run_fuzz(tmp_path, examples)
    else:
        assert REDIS_URL
        prefix = unique_prefix()
        try:
            counts = run_fuzz(tmp_path, examples, prefix)
        finally:
            asyncio.run(delete_prefix(REDIS_URL, prefix))
    assert counts["accepted"] > 0, "no fuzzed submit reached the store"


@pytest.mark.slow
def test_fuzz_http_api_from_openapi_long(tmp_path: Path) -> None:
    counts = run_fuzz(tmp_path, max_examples=1000)
    assert counts["accepted"] > 0
