"""The HTTP contract (DESIGN.md §6) through an HTTP client, lifespan running."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Header, HTTPException, Request

from backgrounder import (
    Assets,
    Job,
    JobManager,
    NoopRunner,
    RunContext,
    Stage,
    TaskRegistry,
)
from backgrounder.errors import StoreError
from backgrounder.fastapi import create_router, setup_backgrounder

API = "/api/v1/jobs"


class Gate:
    """A runner that waits for the test to open its gate, then ends done."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.params: list[dict[str, Any]] = []

    async def execute(self, job: Job, ctx: RunContext) -> Assets:
        self.params.append(job.params)
        await ctx.progress(50, Stage.infer, 1, 2)
        self.started.set()
        await self.release.wait()
        await ctx.progress(100, Stage.write, 2, 2)
        return Assets(custom={"output": {"href": f"/out/{job.id}.json"}})


class Boom:
    """A runner that always raises."""

    async def execute(self, job: Job, ctx: RunContext) -> None:
        raise RuntimeError("boom: the input file is corrupt")


def make_registry(**extra: Any) -> TaskRegistry:
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0))
    registry.add("boom", Boom())
    for name, runner in extra.items():
        registry.add(name, runner)
    return registry


def make_app(
    tmp_path: Path, registry: TaskRegistry | None = None, **options: Any
) -> tuple[FastAPI, JobManager]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    app = FastAPI(lifespan=options.pop("lifespan", None))
    if "store" not in options:
        options["db_path"] = tmp_path / "jobs.db"
    manager = setup_backgrounder(app, registry=registry or make_registry(), **options)
    return app, manager


class Lifespan:
    """Drive an ASGI app's lifespan as a server does, and share its state.

    ``app`` is the app with the lifespan's state put into every request's
    scope, as servers do, so ``request.state`` works.
    """

    def __init__(self, asgi: Any) -> None:
        self.asgi = asgi
        self.state: dict[str, Any] = {}
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Future[None] | None = None

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.asgi({**scope, "state": dict(self.state)}, receive, send)

    async def _step(self, message: str) -> None:
        assert self._task is not None
        await self._inbox.put({"type": f"lifespan.{message}"})
        answer = asyncio.ensure_future(self._outbox.get())
        await asyncio.wait({answer, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not answer.done() or answer.result()["type"].endswith(".failed"):
            answer.cancel()
            await self._task  # raises the lifespan's own exception
            raise RuntimeError(f"lifespan {message} failed")

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": self.state}
        self._task = asyncio.ensure_future(
            self.asgi(scope, self._inbox.get, self._outbox.put)
        )
        await self._step("startup")

    async def shutdown(self) -> None:
        await self._step("shutdown")
        assert self._task is not None
        await self._task

    async def __aenter__(self) -> Lifespan:
        await self.startup()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and yield a client talking to it over ASGI."""
    async with asyncio.timeout(60), Lifespan(app) as lifespan:
        transport = httpx.ASGITransport(lifespan.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test"
        ) as client:
            yield client


async def read_events(
    client: httpx.AsyncClient, job_id: str, **headers: str
) -> list[dict[str, Any]]:
    """Read a job's SSE stream to its end; return the events parsed."""
    async with asyncio.timeout(10):
        response = await client.get(f"{API}/{job_id}/events", headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            name, _, value = line.partition(": ")
            if name in ("event", "id"):
                fields[name] = value
            elif name == "data":
                fields["data"] = json.loads(value)
        if "data" in fields:
            events.append(fields)
    return events


async def wait_status(
    client: httpx.AsyncClient, job_id: str, *statuses: str
) -> dict[str, Any]:
    """Follow the event stream until the job is in one of ``statuses``."""
    events = await read_events(client, job_id)
    last = events[-1]["data"]
    assert last["status"] in statuses, last
    return last


# ---------------------------------------------------------------- submit


async def test_http_submit_returns_202_location_and_job_runs(tmp_path: Path) -> None:
    """A new job answers 202 with a Location that serves it; it runs to done."""
    app, _ = make_app(tmp_path)
    async with serve(app) as client:
        response = await client.post(API, json={"task": "noop", "params": {"n": 1}})
        assert response.status_code == 202
        job = response.json()
        assert job["status"] == "queued"
        assert job["params"] == {"n": 1}
        assert response.headers["location"].endswith(f"{API}/{job['id']}")

        fetched = await client.get(response.headers["location"])
        assert fetched.status_code == 200
        assert fetched.json()["id"] == job["id"]
        done = await wait_status(client, job["id"], "done")
        assert done["progress"]["percent"] == 100


async def test_http_idempotency_key_replays_with_200(tmp_path: Path) -> None:
    """A replayed key answers 200 with the same job, by body or by header."""
    app, _ = make_app(tmp_path, worker_count=0)
    async with serve(app) as client:
        body = {"task": "noop", "params": {"a": 1}, "idempotency_key": "k1"}
        first = await client.post(API, json=body)
        again = await client.post(API, json=body)
        by_header = await client.post(
            API,
            json={"task": "noop", "params": {"a": 1}},
            headers={"Idempotency-Key": "k1"},
        )

        assert first.status_code == 202
        assert again.status_code == 200
        assert by_header.status_code == 200
        assert first.json()["id"] == again.json()["id"] == by_header.json()["id"]
        assert again.headers["location"] == first.headers["location"]
        page = (await client.get(API)).json()
        assert len(page["items"]) == 1


async def test_http_idempotency_key_reused_for_other_request_is_409(
    tmp_path: Path,
) -> None:
    """The same key with other params is a conflict naming the key."""
    app, _ = make_app(tmp_path, worker_count=0)
    async with serve(app) as client:
        await client.post(API, json={"task": "noop", "idempotency_key": "k2"})
        response = await client.post(
            API, json={"task": "noop", "params": {"b": 2}, "idempotency_key": "k2"}
        )
    assert response.status_code == 409
    assert "'k2'" in response.json()["detail"]
    assert "new key" in response.json()["detail"]


async def test_http_idempotency_header_and_body_differ_is_422(tmp_path: Path) -> None:
    """A header key and a different body key are refused, not guessed between."""
    app, _ = make_app(tmp_path, worker_count=0)
    async with serve(app) as client:
        response = await client.post(
            API,
            json={"task": "noop", "idempotency_key": "a"},
            headers={"Idempotency-Key": "b"},
        )
    assert response.status_code == 422
    assert "differ" in response.json()["detail"]


async def test_http_a_damaged_job_is_a_500_naming_it_and_left_out_of_lists(
    tmp_path: Path,
) -> None:
    """A record damaged outside the app answers 500 with the job and what to do
    (not 422: the client did nothing wrong); lists still show the other jobs."""
    app, _ = make_app(tmp_path, worker_count=0)
    async with serve(app) as client:
        good = (await client.post(API, json={"task": "noop"})).json()
        bad = (await client.post(API, json={"task": "noop"})).json()
        with sqlite3.connect(tmp_path / "jobs.db") as conn:
            conn.execute("UPDATE jobs SET params = '{' WHERE id = ?", (bad["id"],))
        conn.close()
        one = await client.get(f"{API}/{bad['id']}")
        page = await client.get(API)
    assert one.status_code == 500
    assert bad["id"] in one.json()["detail"]
    assert "repair or delete" in one.json()["detail"]
    assert page.status_code == 200
    assert [job["id"] for job in page.json()["items"]] == [good["id"]]


async def test_http_idempotency_header_is_read_as_utf8(tmp_path: Path) -> None:
    """A non-ASCII key in the header is the same key as in the body; a header
    that is not UTF-8 is refused with what to send instead."""
    app, _ = make_app(tmp_path, worker_count=0)
    async with serve(app) as client:
        first = await client.post(
            API,
            json={"task": "noop"},
            headers={"Idempotency-Key": "clé ☃".encode()},
        )
        by_body = await client.post(
            API, json={"task": "noop", "idempotency_key": "clé ☃"}
        )
        both = await client.post(
            API,
            json={"task": "noop", "idempotency_key": "clé ☃"},
            headers={"Idempotency-Key": "clé ☃".encode()},
        )
        latin1 = await client.post(
            API, json={"task": "noop"}, headers={"Idempotency-Key": b"cl\xe9"}
        )
    assert first.status_code == 202
    assert first.json()["idempotency_key"] == "clé ☃"
    assert by_body.status_code == both.status_code == 200
    assert by_body.json()["id"] == both.json()["id"] == first.json()["id"]
    assert latin1.status_code == 422
    assert "not UTF-8" in latin1.json()["detail"]


async def test_http_a_refused_value_is_shown_once_and_cut_short(
    tmp_path: Path,
) -> None:
    """A refused value appears once in the detail, and a huge one is cut short
    with its length, not echoed back whole."""
    app, _ = make_app(tmp_path, worker_count=0)
    async with serve(app) as client:
        high = await client.post(API, json={"task": "noop", "priority": "high"})
        in_body = await client.post(
            API, json={"task": "noop", "idempotency_key": "k" * 5000}
        )
        in_header = await client.post(
            API, json={"task": "noop"}, headers={"Idempotency-Key": "k" * 5000}
        )
    assert high.status_code == in_body.status_code == in_header.status_code == 422
    assert high.json()["detail"].count("(got 'high')") == 1
    assert "Value error" not in high.json()["detail"]
    for response in (in_body, in_header):
        detail = response.json()["detail"]
        assert len(detail) < 200 and "255 characters" in detail
    assert "5002 characters as shown" in in_header.json()["detail"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"task": "nope"}', "registered tasks: 'boom', 'noop'"),
        (b'{"task": "noop", "params": [1, 2]}', "params must be a JSON object"),
        (b'{"task": "noop", "params": "x"}', "JSON object (got a string)"),
        (b'{"task": "noop", "params": null}', "JSON object (got null)"),
        (b'{"task": "noop", "priority": 101}', "priority"),
        (
            b'{"task": "noop", "priority": "high"}',
            "priority: priority must be an integer 0-100 (got 'high')",
        ),
        (b'{"task": "noop", "colour": "red"}', "colour"),
        (b'{"task": "noop", "timeout_seconds": -1}', "timeout_seconds"),
        (b'{"params": {}}', "task"),
        (b'{"task": "noop", "params": {"x": NaN}}', "NaN"),
        (b'{"task": "noop", "params": {"x": -Infinity}}', "Infinity"),
        (b'{"task": "noop",', "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "must be a JSON object (got an array)"),
        (b'{"task": "noop", "resources": {"memory_mb": -5}}', "memory_mb"),
    ],
    ids=[
        "unknown-task",
        "params-list",
        "params-string",
        "params-null",
        "priority-range",
        "priority-type",
        "unknown-field",
        "timeout-negative",
        "task-missing",
        "nan",
        "infinity",
        "invalid-json",
        "empty-body",
        "body-not-object",
        "bad-resources",
    ],
)
async def test_http_submit_refuses_bad_requests_with_422(
    tmp_path: Path, body: bytes, fragment: str
) -> None:
    """Every bad submission is 422 with a detail saying what to fix; none stored."""
    app, _ = make_app(tmp_path, worker_count=0)
    async with serve(app) as client:
        response = await client.post(
            API, content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, response.text
        assert fragment in response.json()["detail"]
        assert (await client.get(API)).json()["items"] == []


async def test_http_submit_oversized_params_is_413(tmp_path: Path) -> None:
    """Params over max_params_bytes (but within the body margin) answer 413."""
    app, _ = make_app(tmp_path, worker_count=0, max_params_bytes=1000)
    async with serve(app) as client:
        response = await client.post(
            API, json={"task": "noop", "params": {"blob": "x" * 2000}}
        )
    assert response.status_code == 413
    assert "1000 bytes" in response.json()["detail"]


async def test_http_timeout_seconds_omitted_null_or_given(tmp_path: Path) -> None:
    """Omitted takes the default, null means no limit, a number is kept."""
    app, _ = make_app(tmp_path, worker_count=0, default_timeout_seconds=120)
    async with serve(app) as client:
        omitted = await client.post(API, json={"task": "noop"})
        null = await client.post(API, json={"task": "noop", "timeout_seconds": None})
        given = await client.post(API, json={"task": "noop", "timeout_seconds": 7.5})
    assert omitted.json()["timeout_seconds"] == 120
    assert null.json()["timeout_seconds"] is None
    assert given.json()["timeout_seconds"] == 7.5


# ---------------------------------------------------------------- read


async def test_http_unknown_id_is_404_on_every_job_route(tmp_path: Path) -> None:
    """An id that matches no job is 404 whatever the route, with the id named."""
    app, _ = make_app(tmp_path, worker_count=0)
    async with serve(app) as client:
        for method, path in [
            ("GET", "/nope"),
            ("POST", "/nope/cancel"),
            ("POST", "/nope/retry"),
            ("GET", "/nope/assets"),
            ("GET", "/nope/events"),
            ("GET", "/_healthz"),
        ]:
            response = await client.request(method, API + path)
            assert response.status_code == 404, (method, path)
            assert "not found" in response.json()["detail"]


async def test_http_list_pages_newest_first_and_filters(tmp_path: Path) -> None:
    """GET /jobs pages newest first by cursor and filters by status and task."""
    app, _ = make_app(tmp_path, worker_count=0)
    async with serve(app) as client:
        ids = []
        for n in range(5):
            task = "noop" if n % 2 == 0 else "boom"
            ids.append((await client.post(API, json={"task": task})).json()["id"])
        await client.post(f"{API}/{ids[0]}/cancel")

        first = (await client.get(API, params={"limit": 2})).json()
        second = (
            await client.get(API, params={"limit": 2, "cursor": first["next_cursor"]})
        ).json()
        third = (
            await client.get(API, params={"limit": 2, "cursor": second["next_cursor"]})
        ).json()
        boom = (await client.get(API, params={"task": "boom"})).json()
        canceled = (await client.get(API, params={"status": "canceled"})).json()

    seen = [j["id"] for page in (first, second, third) for j in page["items"]]
    assert seen == ids[::-1]
    assert third["next_cursor"] is None
    assert [j["id"] for j in boom["items"]] == [ids[3], ids[1]]
    assert [j["id"] for j in canceled["items"]] == [ids[0]]


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ({"status": "finished"}, "status must be one of"),
        ({"limit": 0}, "limit must be an integer 1-1000"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "abc"}, "cursor 'abc' is not valid"),
    ],
    ids=["status", "limit-zero", "limit-text", "cursor"],
)
async def test_http_list_bad_filter_is_422(
    tmp_path: Path, query: dict[str, Any], fragment: str
) -> None:
    """A bad filter, limit or cursor answers 422 naming it."""
    app, _ = make_app(tmp_path, worker_count=0)
    async with serve(app) as client:
        response = await client.get(API, params=query)
    assert response.status_code == 422
    assert fragment in response.json()["detail"]


# ---------------------------------------------------------------- control


async def test_http_cancel_retry_and_assets_follow_the_states(tmp_path: Path) -> None:
    """Cancel, retry and assets answer 200 or 409 as the job's state says."""
    gate = Gate()
    app, _ = make_app(tmp_path, make_registry(gate=gate))
    async with serve(app) as client:
        job = (await client.post(API, json={"task": "gate"})).json()
        await gate.started.wait()

        early = await client.get(f"{API}/{job['id']}/assets")
        assert early.status_code == 409
        assert "once it is done" in early.json()["detail"]
        not_failed = await client.post(f"{API}/{job['id']}/retry")
        assert not_failed.status_code == 409

        gate.release.set()
        await wait_status(client, job["id"], "done")
        assets = await client.get(f"{API}/{job['id']}/assets")
        assert assets.status_code == 200
        assert assets.json() == {
            "custom": {"output": {"href": f"/out/{job['id']}.json"}}
        }
        done_cancel = await client.post(f"{API}/{job['id']}/cancel")
        assert done_cancel.status_code == 409
        assert "already done" in done_cancel.json()["detail"]


async def test_http_cancel_queued_then_retry(tmp_path: Path) -> None:
    """A queued job cancels at once (again: no-op 200) and retries as attempt 2."""
    app, _ = make_app(tmp_path, worker_count=0)
    async with serve(app) as client:
        job = (await client.post(API, json={"task": "noop"})).json()

        canceled = await client.post(f"{API}/{job['id']}/cancel")
        again = await client.post(f"{API}/{job['id']}/cancel")
        retried = await client.post(f"{API}/{job['id']}/retry")

    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled"
    assert again.status_code == 200
    assert again.json()["status"] == "canceled"
    assert retried.status_code == 200
    assert retried.json()["status"] == "queued"
    assert retried.json()["attempt"] == 2
    assert retried.json()["error"] is None


async def test_http_cancel_running_job_ends_canceled(tmp_path: Path) -> None:
    """A running job gets cancel_requested and ends canceled."""

    class Sleeper:
        def __init__(self) -> None:
            self.started = asyncio.Event()

        async def execute(self, job: Job, ctx: RunContext) -> None:
            self.started.set()
            while True:
                await ctx.sleep(3600)

    sleeper = Sleeper()
    app, _ = make_app(tmp_path, make_registry(sleeper=sleeper))
    async with serve(app) as client:
        job = (await client.post(API, json={"task": "sleeper"})).json()
        await sleeper.started.wait()
        response = await client.post(f"{API}/{job['id']}/cancel")
        assert response.status_code == 200
        assert response.json()["cancel_requested"] is True
        final = await wait_status(client, job["id"], "canceled")
    assert final["error"]["code"] == "canceled"


async def test_http_tracebacks_hidden_unless_exposed(tmp_path: Path) -> None:
    """A failed job shows its error but its traceback only when the app allows."""
    for expose in (False, True):
        app, _ = make_app(tmp_path / str(expose), expose_tracebacks=expose)
        async with serve(app) as client:
            job = (await client.post(API, json={"task": "boom"})).json()
            failed = await wait_status(client, job["id"], "failed")
            fetched = (await client.get(f"{API}/{job['id']}")).json()
            listed = (await client.get(API)).json()["items"][0]

        for seen in (failed, fetched, listed):
            assert "corrupt" in seen["error"]["message"]
            has_tb = seen["error"]["traceback"] is not None
            assert has_tb is expose
            assert all((e["traceback"] is not None) is expose for e in seen["errors"])
        if expose:
            assert "RuntimeError" in fetched["error"]["traceback"]


# ---------------------------------------------------------------- events


async def test_http_events_stream_from_current_state_to_terminal(
    tmp_path: Path,
) -> None:
    """SSE sends the state now, each progress and status change, and ends."""
    gate = Gate()
    app, _ = make_app(tmp_path, make_registry(gate=gate))
    async with serve(app) as client:
        job = (await client.post(API, json={"task": "gate"})).json()
        await gate.started.wait()
        reader = asyncio.ensure_future(read_events(client, job["id"]))
        while not app.state.backgrounder.events_bus.has_subscribers(job["id"]):
            await asyncio.sleep(0)
        gate.release.set()
        events = await reader

    assert events[0]["event"] == "status"
    assert events[0]["data"]["status"] == "running"
    # The gate opens as soon as the stream subscribes, so the state "now" may
    # already be the runner's second report.
    assert events[0]["data"]["progress"]["percent"] in (50, 100)
    assert events[-1]["event"] == "status"
    assert events[-1]["data"]["status"] == "done"
    percents = [e["data"]["progress"]["percent"] for e in events]
    assert percents == sorted(percents) and percents[-1] == 100
    if percents[0] == 50:
        assert any(
            e["event"] == "progress" and e["data"]["progress"]["percent"] == 100
            for e in events
        )
    ids = [e["id"] for e in events]
    assert all(i.startswith("1-") for i in ids)
    assert ids == sorted(ids, key=lambda i: int(i.split("-")[1]))


async def test_http_events_reconnect_with_last_event_id_gets_current_state(
    tmp_path: Path,
) -> None:
    """A client reconnecting with Last-Event-ID gets the current state at once."""
    app, _ = make_app(tmp_path)
    async with serve(app) as client:
        job = (await client.post(API, json={"task": "noop"})).json()
        first = await read_events(client, job["id"])
        resumed = await read_events(
            client, job["id"], **{"Last-Event-ID": first[0]["id"]}
        )
    assert resumed == [
        {"event": "status", "id": first[-1]["id"], "data": first[-1]["data"]}
    ]
    assert resumed[0]["data"]["status"] == "done"


# ---------------------------------------------------------------- service


async def test_http_health_and_resources_are_not_job_ids(tmp_path: Path) -> None:
    """_health and _resources answer their reports, never a job lookup."""
    app, _ = make_app(tmp_path, worker_count=2)
    async with serve(app) as client:
        health = await client.get(f"{API}/_health")
        resources = await client.get(f"{API}/_resources")
    assert health.status_code == 200
    body = health.json()
    assert body["ok"] is True
    assert body["store"] == {"name": "sqlite", "ok": True}
    assert body["queue"] == {"name": "memory", "ok": True}
    assert body["worker"]["alive"] is True
    assert resources.status_code == 200
    report = resources.json()
    assert set(report) == {"limits", "usage", "reserved", "running_jobs", "gpus"}
    assert set(report["usage"]) == {"memory_used_mb", "memory_total_mb", "cpu_percent"}
    assert set(report["reserved"]) == {"memory_mb", "gpu_memory_mb"}
    assert report["running_jobs"] == 0


async def test_http_openapi_documents_models_with_descriptions(tmp_path: Path) -> None:
    """The request body and the job appear in OpenAPI with field descriptions."""
    app, _ = make_app(tmp_path, worker_count=0)
    async with serve(app) as client:
        schema = (await client.get("/openapi.json")).json()
    paths = schema["paths"]
    assert set(paths) >= {
        API,
        f"{API}/{{job_id}}",
        f"{API}/{{job_id}}/cancel",
        f"{API}/{{job_id}}/retry",
        f"{API}/{{job_id}}/assets",
        f"{API}/{{job_id}}/events",
        f"{API}/_health",
        f"{API}/_resources",
    }
    body = paths[API]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["title"] == "JobRequest"
    assert body["required"] == ["task"]
    for name in ("task", "params", "priority", "timeout_seconds", "idempotency_key"):
        assert body["properties"][name]["description"]
    responses = paths[API]["post"]["responses"]
    assert {"200", "202", "409", "413", "422"} <= set(responses)
    job = schema["components"]["schemas"]["Job"]
    assert all(field.get("description") for field in job["properties"].values())
    assert "ErrorBody" in schema["components"]["schemas"]


# ---------------------------------------------------------------- auth


def require_token(x_token: str | None = Header(None)) -> None:
    if x_token != "secret":
        raise HTTPException(status_code=403, detail="send X-Token")


ROUTES = [
    ("POST", "", {"task": "noop"}),
    ("GET", "", None),
    ("GET", "/_health", None),
    ("GET", "/_resources", None),
    ("GET", "/{id}", None),
    ("POST", "/{id}/cancel", None),
    ("POST", "/{id}/retry", None),
    ("GET", "/{id}/assets", None),
    ("GET", "/{id}/events", None),
]


async def test_http_dependencies_guard_every_route(tmp_path: Path) -> None:
    """With dependencies=[Depends(auth)], every route is 403 without the header."""
    app, _ = make_app(tmp_path, worker_count=0, dependencies=[Depends(require_token)])
    async with serve(app) as client:
        job = (
            await client.post(API, json={"task": "noop"}, headers={"X-Token": "secret"})
        ).json()
        await client.post(f"{API}/{job['id']}/cancel", headers={"X-Token": "secret"})
        for method, path, body in ROUTES:
            url = API + path.format(id=job["id"])
            denied = await client.request(method, url, json=body)
            assert denied.status_code == 403, (method, path)
            assert denied.json() == {"detail": "send X-Token"}
        allowed = await client.get(f"{API}/{job['id']}", headers={"X-Token": "secret"})
        assert allowed.status_code == 200


# ---------------------------------------------------------------- lifespan


async def test_http_lifespan_composes_with_the_apps_own(tmp_path: Path) -> None:
    """The app's lifespan runs inside the manager's: its state and jobs work."""
    calls: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        manager: JobManager = app.state.backgrounder
        job = await manager.submit("noop", {"from": "startup"})
        calls.append("startup")
        yield {"greeting": "hello", "startup_job": job.id}
        calls.append("shutdown")

    app, manager = make_app(tmp_path, lifespan=lifespan)

    @app.get("/greet")
    async def greet(request: Request) -> dict[str, str]:
        return {
            "greeting": request.state.greeting,
            "job": request.state.startup_job,
        }

    async with serve(app) as client:
        assert manager.started
        greeting = (await client.get("/greet")).json()
        assert greeting["greeting"] == "hello"
        done = await wait_status(client, greeting["job"], "done")
        assert done["params"] == {"from": "startup"}
        assert calls == ["startup"]

    assert calls == ["startup", "shutdown"]
    assert not manager.started


async def test_http_setup_twice_is_refused(tmp_path: Path) -> None:
    """A second setup_backgrounder on one app is a clear error."""
    app, _ = make_app(tmp_path)
    with pytest.raises(ValueError, match="already called"):
        setup_backgrounder(app, db_path=tmp_path / "other.db")


async def test_b36a_unwritable_store_fails_startup_naming_the_path(
    tmp_path: Path,
) -> None:
    """A store path that cannot be written fails the start, leaving nothing running."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    threads_before = {t.ident for t in threading.enumerate()}
    bad_path = blocker / "jobs.db"
    app = FastAPI()
    manager = setup_backgrounder(
        app, db_path=bad_path, registry=make_registry(), worker_count=2
    )

    with pytest.raises(StoreError, match=re.escape(str(bad_path))):
        async with serve(app):
            pass

    assert not manager.started
    assert manager.worker is None
    assert new_threads(threads_before) == []
    assert not [
        t
        for t in asyncio.all_tasks()
        if t.get_name().startswith("backgrounder") and not t.done()
    ]


async def test_b36a_app_startup_failure_closes_the_manager(tmp_path: Path) -> None:
    """If the app's own start-up fails, the started manager is closed again."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        raise RuntimeError("the model file is missing")
        yield

    threads_before = {t.ident for t in threading.enumerate()}
    app, manager = make_app(tmp_path, lifespan=lifespan)
    with pytest.raises(RuntimeError, match="model file"):
        async with serve(app):
            pass
    assert not manager.started
    assert manager.worker is not None and not manager.worker.status()["alive"]
    assert new_threads(threads_before) == []


async def test_b36d_router_without_setup_answers_503_saying_what_to_do(
    tmp_path: Path,
) -> None:
    """The router mounted alone answers 503 naming setup_backgrounder."""
    app = FastAPI()
    app.include_router(create_router(), prefix="/api/v1")
    async with serve(app) as client:
        for method, path, body in ROUTES:
            response = await client.request(
                method, API + path.format(id="abc"), json=body
            )
            assert response.status_code == 503, (method, path)
            assert "setup_backgrounder" in response.json()["detail"]


async def test_b36d_lifespan_not_run_answers_503(tmp_path: Path) -> None:
    """A set-up app served without its lifespan says the manager is not running."""
    app, _ = make_app(tmp_path)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post(API, json={"task": "noop"})
        health = await client.get(f"{API}/_health")
    assert response.status_code == 503
    assert "lifespan" in response.json()["detail"]
    assert health.status_code == 503


async def test_http_submit_while_draining_is_503(tmp_path: Path) -> None:
    """During shutdown's drain, POST /jobs answers 503 and the running job ends."""
    gate = Gate()
    app, manager = make_app(
        tmp_path, make_registry(gate=gate), shutdown_grace_seconds=30
    )
    lifespan = Lifespan(app)
    await lifespan.startup()
    transport = httpx.ASGITransport(lifespan.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        job = (await client.post(API, json={"task": "gate"})).json()
        await gate.started.wait()
        shutdown = asyncio.ensure_future(lifespan.shutdown())
        await until(lambda: manager.worker.status()["stopping"])

        refused = await client.post(API, json={"task": "noop"})
        health = await client.get(f"{API}/_health")
        gate.release.set()
        await shutdown

    assert refused.status_code == 503
    assert "shutting down" in refused.json()["detail"]
    assert refused.headers["retry-after"]
    assert health.status_code == 503
    app2, _ = make_app(tmp_path, worker_count=0)
    async with serve(app2) as client:
        final = (await client.get(f"{API}/{job['id']}")).json()
        listed = (await client.get(API)).json()["items"]
    assert final["status"] == "done"
    assert len(listed) == 1


def new_threads(before: set[int | None]) -> list[threading.Thread]:
    """Threads still alive (after a join of up to 5 s) that were not in ``before``.

    A closed connection's thread ends a moment after close() returns, hence the
    join. The event loop's own executor threads (``asyncio_N``) are the loop's,
    joined when it closes, so they are left out.
    """
    fresh = [
        t
        for t in threading.enumerate()
        if t.ident not in before and not t.name.startswith("asyncio_")
    ]
    for thread in fresh:
        thread.join(5)
    return [t for t in fresh if t.is_alive()]


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (bounded by a timeout)."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0)
