"""The dashboard in headless Chromium against the app served by uvicorn.

Needs Debian's ``chromium`` at /usr/bin/chromium and the ``playwright`` package
(the ``browser`` extra); ``.ci/run`` installs the browser. Playwright's own
browser download is never used.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from backgrounder import (
    Assets,
    Job,
    NoopRunner,
    RunContext,
    Stage,
    TaskRegistry,
    setup_backgrounder,
)

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        f"no browser: {CHROMIUM} is missing (apt-get install chromium)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="playwright is not installed (pip install 'backgrounder[browser]')",
)
expect = sync_api.expect

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
API = "/api/v1/jobs"
DASHBOARD = f"{API}/_dashboard"
#: How long a browser expectation waits before it fails, in milliseconds.
EXPECT_MS = 15_000


class Gates:
    """Named gates that runners wait at until the test thread opens them.

    The server runs on its own thread and loop; a runner waits for a gate in
    a worker thread, so the test can open it from its own thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gates: dict[str, threading.Semaphore] = {}

    def _gate(self, name: str) -> threading.Semaphore:
        with self._lock:
            return self._gates.setdefault(name, threading.Semaphore(0))

    def open(self, name: str, times: int = 1) -> None:
        """Let a runner waiting at ``name`` go on, ``times`` times."""
        self._gate(name).release(times)

    async def wait(self, name: str) -> None:
        """Wait until the test opens ``name``; fail after 30 s."""
        gate = self._gate(name)
        if not await asyncio.to_thread(gate.acquire, True, 30):
            raise TimeoutError(f"gate {name!r} was never opened")

    def open_all(self) -> None:
        """Open every gate widely, so no runner thread outlives the test."""
        with self._lock:
            gates = list(self._gates.values())
        for gate in gates:
            gate.release(100)


class Stepper:
    """Report each step of ``params["steps"]``, waiting at the gate between steps.

    A step is ``[percent, stage, processed, total, message]``. After the last
    step it waits once more, then ends done.
    """

    def __init__(self, gates: Gates) -> None:
        self.gates = gates

    async def execute(self, job: Job, ctx: RunContext) -> Assets:
        gate = str(job.params["gate"])
        for i, (percent, stage, processed, total, message) in enumerate(
            job.params["steps"]
        ):
            if i:
                await self.gates.wait(gate)
            await ctx.progress(percent, Stage(stage), processed, total, message)
        await self.gates.wait(gate)
        return Assets(custom={"report": {"href": f"reports/{job.id}.json"}})


class Waits:
    """Wait until canceled, reporting progress first."""

    async def execute(self, job: Job, ctx: RunContext) -> None:
        await ctx.progress(30, Stage.preprocess, 3, 10, "reading the corpus")
        await ctx.sleep(3600)


class FailsFirst:
    """Fail on the first attempt, succeed on later ones."""

    async def execute(self, job: Job, ctx: RunContext) -> Assets:
        await ctx.progress(40, Stage.infer, 2, 5)
        if job.attempt == 1:
            raise RuntimeError(f"model server refused the batch: {job.params}")
        return Assets(custom={"rows": 5})


class Served:
    """The app on uvicorn in a thread, with a sync HTTP client for the test."""

    def __init__(self, app: FastAPI, gates: Gates) -> None:
        self.gates = gates
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        port = self._socket.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )
        self.http = httpx.Client(base_url=self.base, timeout=20)

    def start(self) -> None:
        self._thread.start()
        started = threading.Event()

        def watch() -> None:
            while self._thread.is_alive() and not self.server.started:
                started.wait(0.02)
            started.set()

        threading.Thread(target=watch, daemon=True).start()
        assert started.wait(20) and self.server.started, "uvicorn did not start"

    def stop(self) -> None:
        self.gates.open_all()
        self.server.should_exit = True
        self._thread.join(30)
        self.http.close()
        self._socket.close()

    def submit(self, task: str, params: dict[str, Any] | None = None) -> str:
        response = self.http.post(API, json={"task": task, "params": params or {}})
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    def wait(self, job_id: str, *statuses: str) -> dict[str, Any]:
        """Follow the job's event stream until it reaches one of ``statuses``."""
        with self.http.stream("GET", f"{API}/{job_id}/events") as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    job: dict[str, Any] = json.loads(line[5:])
                    if job["status"] in statuses:
                        return job
        job = self.http.get(f"{API}/{job_id}").json()
        assert job["status"] in statuses, job
        return job

    def wait_progress(self, job_id: str, percent: float) -> None:
        """Follow the job's event stream until its progress reaches ``percent``."""
        with self.http.stream("GET", f"{API}/{job_id}/events") as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    if json.loads(line[5:])["progress"]["percent"] >= percent:
                        return
        raise AssertionError(f"job {job_id} ended before {percent}%")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The demo-like app with the dashboard and metrics on, served on loopback."""
    gates = Gates()
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0))
    registry.add("embed", Stepper(gates))
    registry.add("transcode", Waits())
    registry.add("ingest", FailsFirst())
    app = FastAPI()
    setup_backgrounder(
        app,
        db_path=tmp_path_factory.mktemp("dashboard") / "jobs.db",
        registry=registry,
        worker_count=8,
        dashboard=True,
        metrics=True,
        shutdown_grace_seconds=0,
        cancel_grace_seconds=1,
    )
    server = Served(app, gates)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(served: Served) -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright."""
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, served: Served) -> Iterator[Any]:
    """A fresh page that fails the test on any request off the app's origin."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    outside: list[str] = []
    context.on(
        "request",
        lambda request: (
            None if request.url.startswith(served.base) else outside.append(request.url)
        ),
    )
    page = context.new_page()
    page.set_default_timeout(EXPECT_MS)
    expect.set_options(timeout=EXPECT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not outside, f"the dashboard requested other origins: {outside}"
    assert not errors, f"the page raised: {errors}"


def _row(page: Any, job_id: str) -> Any:
    return page.locator(f'tr[data-job-id="{job_id}"]')


def test_dashboard_lists_jobs_newest_first_with_filters(
    served: Served, page: Any
) -> None:
    """The list shows each job's task and status, newest first, and filters."""
    first = served.submit("noop", {"n": 1})
    second = served.submit("noop", {"n": 2})
    failed = served.submit("ingest", {"n": 3})
    for job_id in (first, second):
        served.wait(job_id, "done")
    served.wait(failed, "failed")

    page.goto(served.base + DASHBOARD)
    expect(_row(page, first).locator(".status")).to_have_text("done")
    expect(_row(page, failed).locator(".status")).to_have_text("failed")
    ids = page.locator("tr[data-job-id]").evaluate_all(
        "rows => rows.map(r => r.dataset.jobId)"
    )
    assert ids.index(failed) < ids.index(second) < ids.index(first)

    page.select_option("select[name=status]", "failed")
    page.click("button[type=submit]")
    expect(_row(page, failed)).to_be_visible()
    expect(_row(page, first)).to_have_count(0)
    statuses = page.locator("tr[data-job-id] .status").all_inner_texts()
    assert set(statuses) == {"failed"}

    page.goto(served.base + DASHBOARD + "?task=noop")
    expect(_row(page, first)).to_be_visible()
    expect(_row(page, failed)).to_have_count(0)


def test_dashboard_pages_through_jobs_with_next_cursor(
    served: Served, page: Any
) -> None:
    """The "Older" link follows next_cursor to the next page of jobs."""
    ids = [served.submit("noop", {"page": i}) for i in range(30)]
    for job_id in ids:
        served.wait(job_id, "done")

    page.goto(served.base + DASHBOARD + "?task=noop")
    expect(_row(page, ids[-1])).to_be_visible()
    expect(_row(page, ids[0])).to_have_count(0)
    page.click("a[rel=next]")
    expect(_row(page, ids[0])).to_be_visible()
    expect(_row(page, ids[-1])).to_have_count(0)


def test_dashboard_progress_bar_moves_with_the_running_job(
    served: Served, page: Any
) -> None:
    """A running job's bar, stage and numbers follow its progress events live."""
    gate = "moves"
    job_id = served.submit(
        "embed",
        {
            "gate": gate,
            "steps": [
                [10, "fetch", 1, 10, "downloading"],
                [45, "infer", 9, 20, "batch 9"],
                [80, "write", 4, 5, "writing rows"],
            ],
        },
    )
    served.wait_progress(job_id, 10)

    page.goto(served.base + DASHBOARD)
    row = _row(page, job_id)
    bar = row.locator("progress")
    expect(row.locator(".status")).to_have_text("running")
    expect(bar).to_have_attribute("value", "10")
    expect(row.locator(".stage-name")).to_have_text("fetch")

    served.gates.open(gate)
    expect(bar).to_have_attribute("value", "45")
    expect(row.locator(".stage-name")).to_have_text("infer")
    expect(row.locator(".progress-numbers")).to_have_text("9/20 · 45%")
    expect(row.locator(".message")).to_have_text("batch 9")
    expect(row.locator(".stages li.current")).to_have_attribute("data-stage", "infer")

    served.gates.open(gate)
    expect(bar).to_have_attribute("value", "80")
    expect(row.locator(".stage-name")).to_have_text("write")

    served.gates.open(gate)
    expect(row.locator(".status")).to_have_text("done")


def test_dashboard_cancel_button_cancels_a_running_job(
    served: Served, page: Any
) -> None:
    """Cancel on a running job's row ends it canceled, and the row shows it."""
    job_id = served.submit("transcode", {"file": "talk.mp4"})
    served.wait_progress(job_id, 30)

    page.goto(served.base + DASHBOARD)
    row = _row(page, job_id)
    expect(row.locator(".status")).to_have_text("running")
    expect(row.locator("[data-action=retry]")).to_be_hidden()
    row.locator("[data-action=cancel]").click()

    expect(row.locator(".status")).to_have_text("canceled")
    expect(row.locator("[data-action=cancel]")).to_be_hidden()
    expect(row.locator("[data-action=retry]")).to_be_visible()
    assert served.http.get(f"{API}/{job_id}").json()["status"] == "canceled"


def test_dashboard_follows_more_running_jobs_than_it_streams(
    served: Served, page: Any
) -> None:
    """With more running jobs than streams, every Cancel still works and shows."""
    ids = [served.submit("transcode", {"file": f"part-{i}.mp4"}) for i in range(7)]
    for job_id in ids:
        served.wait_progress(job_id, 30)

    page.goto(served.base + DASHBOARD + "?status=running")
    for job_id in ids:
        expect(_row(page, job_id).locator(".status")).to_have_text("running")
    for job_id in ids:
        _row(page, job_id).locator("[data-action=cancel]").click()
    for job_id in ids:
        expect(_row(page, job_id).locator(".status")).to_have_text("canceled")


def test_dashboard_retry_button_runs_a_failed_job_again(
    served: Served, page: Any
) -> None:
    """Retry on a failed job queues attempt 2, which the row follows to done."""
    job_id = served.submit("ingest", {"batch": 7})
    served.wait(job_id, "failed")

    page.goto(served.base + DASHBOARD)
    row = _row(page, job_id)
    expect(row.locator(".status")).to_have_text("failed")
    row.locator("[data-action=retry]").click()

    expect(row.locator(".status")).to_have_text("done")
    expect(row.locator("[data-field=attempt]")).to_have_text("2")
    expect(page.locator("#flash")).to_contain_text("Queued again")
    job = served.http.get(f"{API}/{job_id}").json()
    assert (job["status"], job["attempt"]) == ("done", 2)


def test_dashboard_shows_the_api_error_detail_when_an_action_fails(
    served: Served, page: Any
) -> None:
    """A stale Retry button on a job that is done now shows the API's 409 detail."""
    job_id = served.submit("ingest", {"batch": 8})
    served.wait(job_id, "failed")
    page.goto(served.base + DASHBOARD)
    row = _row(page, job_id)
    expect(row.locator("[data-action=retry]")).to_be_visible()

    assert served.http.post(f"{API}/{job_id}/retry").status_code == 200
    served.wait(job_id, "done")
    row.locator("[data-action=retry]").click()

    detail = served.http.post(f"{API}/{job_id}/retry").json()["detail"]
    flash = page.locator("#flash")
    expect(flash).to_contain_text("HTTP 409")
    expect(flash).to_contain_text(detail)


def test_dashboard_detail_shows_params_error_assets_and_history(
    served: Served, page: Any
) -> None:
    """A job's page shows its params, its error, then assets and earlier errors."""
    job_id = served.submit("ingest", {"source": "s3://bucket/a.csv", "rows": 5})
    served.wait(job_id, "failed")

    page.goto(served.base + DASHBOARD)
    page.click(f'tr[data-job-id="{job_id}"] a')
    expect(page.locator("h1")).to_have_text("ingest")
    expect(page.locator(".params-json")).to_contain_text(
        '"source": "s3://bucket/a.csv"'
    )
    expect(page.locator(".error-card")).to_contain_text("model server refused")
    expect(page.locator(".error-card")).to_contain_text("infer")

    page.click("[data-action=retry]")
    expect(page.locator(".job-view .status")).to_have_text("done")
    expect(page.locator(".job-view")).to_contain_text('"rows": 5')
    expect(page.locator(".errors")).to_contain_text("model server refused")
    expect(page.locator("[data-field=attempt]")).to_have_text("2")


def test_dashboard_escapes_params_and_messages(served: Served, page: Any) -> None:
    """Markup in params, messages and errors is shown as text and never runs."""
    attack = "<img src=x onerror=window.__pwned=1><script>window.__pwned=2</script>"
    gate = "xss"
    job_id = served.submit(
        "embed",
        {"gate": gate, "note": attack, "steps": [[50, "infer", 1, 2, attack]]},
    )
    failed = served.submit("ingest", {"note": attack})
    served.wait_progress(job_id, 50)
    served.wait(failed, "failed")

    page.goto(served.base + DASHBOARD)
    row = _row(page, job_id)
    expect(row.locator(".message")).to_have_text(attack)
    expect(row.locator(".params")).to_contain_text("<img src=x")
    page.goto(served.base + f"{DASHBOARD}/{failed}")
    expect(page.locator(".params-json")).to_contain_text(attack)
    expect(page.locator(".error-message")).to_contain_text("<script>")
    page.goto(served.base + f"{DASHBOARD}/{job_id}")
    expect(page.locator(".job-view .message")).to_have_text(attack)

    assert page.evaluate("window.__pwned") is None
    assert page.locator("main img, main script").count() == 0
    served.gates.open(gate)


def test_dashboard_screenshot(served: Served, page: Any) -> None:
    """Save a screenshot of a busy list as a test artifact (and for the docs).

    Set BACKGROUNDER_DOCS_SCREENSHOT=1 to also write docs/dashboard.png.
    """
    gate = "screenshot"
    for i in range(3):
        served.wait(served.submit("noop", {"item": i}), "done")
    failed = served.submit("ingest", {"source": "s3://raw/2026-12-03.csv"})
    served.wait(failed, "failed")
    canceled = served.submit("transcode", {"file": "keynote.mp4", "codec": "av1"})
    served.wait_progress(canceled, 30)
    served.http.post(f"{API}/{canceled}/cancel")
    served.wait(canceled, "canceled")
    running = served.submit(
        "embed",
        {
            "gate": gate,
            "model": "e5-large",
            "steps": [[62, "infer", 310, 500, "batch 31 of 50"]],
        },
    )
    slow = served.submit("transcode", {"file": "interview.mov"})
    served.wait_progress(running, 62)
    served.wait_progress(slow, 30)

    page.goto(served.base + DASHBOARD)
    expect(_row(page, running).locator("progress")).to_have_attribute("value", "62")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    page.screenshot(path=str(shot), full_page=False)
    page.goto(served.base + f"{DASHBOARD}/{failed}")
    page.screenshot(path=str(ARTIFACTS / "dashboard-job.png"), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("BACKGROUNDER_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "dashboard.png")

    served.gates.open(gate)
    served.http.post(f"{API}/{slow}/cancel")
