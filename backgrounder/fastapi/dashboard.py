"""The dashboard: server-rendered pages over the job API, with live progress.

Plain HTML built here, one stylesheet and one script shipped in ``static/``;
no build step and no request leaves the app. Every value that comes from a job
(params, messages, task names, ids) is escaped before it reaches the page, and
the pages forbid inline scripts through their Content-Security-Policy.
"""

from __future__ import annotations

import json
from datetime import datetime
from html import escape
from importlib import resources
from string import Template
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse

from backgrounder.errors import JobNotFoundError
from backgrounder.fastapi.router import _public, get_manager
from backgrounder.manager import JobManager
from backgrounder.models import TERMINAL_STATUSES, ErrorInfo, Job, JobStatus, Stage

__all__ = ["add_dashboard_routes"]

#: The files ``/_dashboard/static/{name}`` serves, with their media types.
STATIC_TYPES = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}

#: Stages a job walks through, in order, as the progress bars show them.
STAGES = [stage for stage in Stage if stage != Stage.idle]

PAGE_SIZE = 25

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

Manager = Annotated[JobManager, Depends(get_manager)]


def _read_static(name: str) -> str:
    return (resources.files(__package__) / "static" / name).read_text("utf-8")


def add_dashboard_routes(router: APIRouter) -> None:
    """Add the dashboard's routes to the jobs router.

    ``/_dashboard`` lists jobs, ``/_dashboard/{job_id}`` shows one, and
    ``/_dashboard/static/{name}`` serves the stylesheet and script. Call it
    before the ``/{job_id}`` routes are added, so no job id shadows them.
    """
    # Read once, when the app is built, so no request touches the disk.
    page = Template(_read_static("page.html"))
    assets = {name: _read_static(name) for name in STATIC_TYPES}

    @router.get(
        "/_dashboard",
        name="backgrounder_dashboard",
        summary="Dashboard: the job list",
        response_class=HTMLResponse,
        include_in_schema=False,
    )
    async def dashboard(
        request: Request,
        manager: Manager,
        status: Annotated[str | None, Query()] = None,
        task: Annotated[str | None, Query()] = None,
        cursor: Annotated[str | None, Query()] = None,
    ) -> HTMLResponse:
        """Render the newest jobs, filtered by status and task, with live progress."""
        links = _Links(request)
        body = await _list_body(manager, links, status or None, task or None, cursor)
        return _html(page, links, "Jobs", body)

    @router.get(
        "/_dashboard/static/{name}",
        name="backgrounder_dashboard_static",
        include_in_schema=False,
    )
    async def dashboard_static(name: str) -> Response:
        """Serve the dashboard's stylesheet and script."""
        if name not in assets:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(
            assets[name],
            media_type=STATIC_TYPES[name],
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    @router.get(
        "/_dashboard/{job_id}",
        name="backgrounder_dashboard_job",
        summary="Dashboard: one job",
        response_class=HTMLResponse,
        include_in_schema=False,
    )
    async def dashboard_job(
        job_id: str, request: Request, manager: Manager
    ) -> HTMLResponse:
        """Render one job: progress, facts, params, error, assets, history."""
        links = _Links(request)
        try:
            job = _public(await manager.get(job_id), manager)
        except JobNotFoundError:
            # A page, not the API's JSON answer: a person follows this link.
            body = (
                f'<p class="crumbs"><a href="{_e(links.home)}">&larr; All jobs</a></p>'
                f'<div class="card notice">No job has the id <code>{_e(job_id)}'
                "</code>.</div>"
            )
            return _html(page, links, "Job not found", body, status_code=404)
        return _html(page, links, f"Job {job.id}", _detail_body(manager, links, job))


# ---------------------------------------------------------------- helpers


def _e(value: object) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return escape(str(value), quote=True)


class _Links:
    """The paths the pages link to, from the router's own route names."""

    def __init__(self, request: Request) -> None:
        self.home = request.url_for("backgrounder_dashboard").path
        self.api = request.url_for("backgrounder_list_jobs").path
        self.static = self.home + "/static"

    def job(self, job_id: str) -> str:
        return f"{self.home}/{quote(job_id, safe='')}"

    def listing(self, **query: str | None) -> str:
        kept = {key: value for key, value in query.items() if value}
        return f"{self.home}?{urlencode(kept)}" if kept else self.home


def _html(
    page: Template, links: _Links, title: str, body: str, status_code: int = 200
) -> HTMLResponse:
    text = page.substitute(
        title=_e(title),
        static=_e(links.static),
        api=_e(links.api),
        home=_e(links.home),
        body=body,
    )
    return HTMLResponse(text, status_code=status_code, headers=HEADERS)


def _when(moment: datetime | None, short: bool = False) -> str:
    if moment is None:
        return "—"
    text = moment.strftime("%m-%d %H:%M:%S" if short else "%Y-%m-%d %H:%M:%S")
    iso = _e(moment.isoformat())
    return f'<time datetime="{iso}" title="{iso}">{_e(text)}</time>'


def _seconds(total: float) -> str:
    if total < 1:
        return f"{total * 1000:.0f} ms"
    if total < 120:
        return f"{total:.1f} s"
    minutes, seconds = divmod(int(total), 60)
    if minutes < 120:
        return f"{minutes} min {seconds:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _duration(job: Job, now: datetime) -> str:
    if job.started_at is None:
        return "—"
    end = job.finished_at if job.finished_at is not None else now
    return _seconds(max(0.0, (end - job.started_at).total_seconds()))


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


def _progress(job: Job) -> str:
    """Return the stage track, the bar and the numbers the script keeps live."""
    progress = job.progress
    current = STAGES.index(progress.stage) if progress.stage in STAGES else -1
    items = "".join(
        f'<li class="{"past" if i < current else "current" if i == current else ""}"'
        f' data-stage="{stage}" title="{stage}">{stage}</li>'
        for i, stage in enumerate(STAGES)
    )
    percent = round(progress.percent)
    if progress.total > 0:
        numbers = f"{progress.processed}/{progress.total} · {percent}%"
    elif progress.processed > 0:
        numbers = f"{progress.processed} · {percent}%"
    else:
        numbers = f"{percent}%"
    return (
        f'<ol class="stages" aria-hidden="true">{items}</ol>'
        f'<progress max="100" value="{percent}" aria-label="progress">'
        f"{percent}%</progress>"
        '<div class="progress-text">'
        f'<span class="stage-name">{_e(progress.stage)}</span>'
        f'<span class="progress-numbers">{_e(numbers)}</span></div>'
        f'<div class="message" title="{_e(progress.message or "")}">'
        f"{_e(progress.message or '')}</div>"
    )


def _buttons() -> str:
    return (
        '<button type="button" class="danger" data-action="cancel">Cancel</button> '
        '<button type="button" class="retry" data-action="retry">Retry</button>'
    )


def _job_attrs(job: Job) -> str:
    return (
        f'data-job-id="{_e(job.id)}" data-status="{_e(job.status)}" '
        f'data-cancel-requested="{"true" if job.cancel_requested else "false"}"'
    )


def _status(job: Job) -> str:
    return (
        f'<span class="status">{_e(job.status)}</span>'
        '<span class="canceling">canceling…</span>'
    )


# ---------------------------------------------------------------- the list


async def _list_body(
    manager: JobManager,
    links: _Links,
    status: str | None,
    task: str | None,
    cursor: str | None,
) -> str:
    notice = ""
    try:
        page = await manager.list(
            status=status, task=task, limit=PAGE_SIZE, cursor=cursor
        )
        items, next_cursor = page.items, page.next_cursor
    except ValueError as exc:
        # A bad filter or a stale cursor: say so on the page, keep the filters.
        items, next_cursor = [], None
        notice = f'<div class="flash">{_e(exc)}</div>'
    counts = await manager.store.count_by_status()
    now = manager.clock.now()
    rows = "".join(_row(_public(job, manager), links, now) for job in items)
    if not rows:
        rows = '<tr><td colspan="9" class="notice">No jobs match.</td></tr>'
    pager = '<nav class="pager"><span>'
    if cursor:
        pager += f'<a href="{_e(links.listing(status=status, task=task))}">'
        pager += "&laquo; Newest</a>"
    pager += f"</span><span>{len(items)} job(s) shown</span><span>"
    if next_cursor:
        older = links.listing(status=status, task=task, cursor=next_cursor)
        pager += f'<a href="{_e(older)}" rel="next">Older &raquo;</a>'
    pager += "</span></nav>"
    return (
        notice
        + _summary(counts, links, status, task)
        + _filters(manager, status, task, links)
        + '<div class="card jobs-card"><table class="jobs"><thead><tr>'
        "<th>Job</th><th>Task</th><th>Status</th><th>Progress</th>"
        '<th class="num">Attempt</th><th>Params</th><th>Submitted</th>'
        '<th class="num">Ran for</th><th></th></tr></thead>'
        f"<tbody>{rows}</tbody></table></div>{pager}"
    )


def _summary(
    counts: dict[Any, int], links: _Links, status: str | None, task: str | None
) -> str:
    cards = []
    for each in JobStatus:
        count = counts.get(each, counts.get(str(each), 0))
        active = " active" if status == each else ""
        href = links.listing(status=None if status == each else each, task=task)
        cards.append(
            f'<a class="count count-{each}{active}" href="{_e(href)}">'
            f"<b>{count}</b><span>{each}</span></a>"
        )
    return f'<div class="summary">{"".join(cards)}</div>'


def _filters(
    manager: JobManager, status: str | None, task: str | None, links: _Links
) -> str:
    options = '<option value="">any</option>' + "".join(
        f'<option value="{each}"{" selected" if status == each else ""}>{each}</option>'
        for each in JobStatus
    )
    tasks = "".join(f'<option value="{_e(name)}">' for name in manager.registry.names())
    return (
        '<div class="card toolbar">'
        f'<form class="filters" method="get" action="{_e(links.home)}">'
        f'<label>Status<select name="status">{options}</select></label>'
        '<label>Task<input type="text" name="task" list="task-names" '
        f'placeholder="any" value="{_e(task or "")}"></label>'
        f'<datalist id="task-names">{tasks}</datalist>'
        '<button type="submit" class="primary">Filter</button>'
        f'<a class="button" href="{_e(links.home)}">Clear</a>'
        "</form>"
        f'<a class="button" href="{_e(links.listing(status=status, task=task))}">'
        "Refresh</a></div>"
    )


def _row(job: Job, links: _Links, now: datetime) -> str:
    params = json.dumps(job.params, ensure_ascii=False, sort_keys=True)
    preview = params if len(params) <= 80 else params[:77] + "…"
    return (
        f'<tr class="job" {_job_attrs(job)}>'
        f'<td><a class="mono" href="{_e(links.job(job.id))}" title="{_e(job.id)}">'
        f"{_e(job.id[:12])}</a></td>"
        f"<td>{_e(job.task)}</td>"
        f"<td>{_status(job)}</td>"
        f'<td class="progress">{_progress(job)}</td>'
        f'<td class="num" data-field="attempt">{job.attempt}</td>'
        f'<td class="params mono" title="{_e(preview)}">{_e(preview)}</td>'
        f'<td class="when">{_when(job.created_at, short=True)}</td>'
        f'<td class="num when">{_duration(job, now)}</td>'
        f'<td class="actions">{_buttons()}</td></tr>'
    )


# ---------------------------------------------------------------- one job


def _detail_body(manager: JobManager, links: _Links, job: Job) -> str:
    now = manager.clock.now()
    resources_text = (
        _e(json.dumps(job.resources.model_dump(exclude_none=True)))
        if job.resources is not None
        else "—"
    )
    facts = [
        ("Task", _e(job.task)),
        ("Status", _e(job.status)),
        ("Attempt", f'<span data-field="attempt">{job.attempt}</span>'),
        ("Retries", f"{job.retries} of {job.max_retries}"),
        ("Priority", str(job.priority)),
        (
            "Timeout",
            _seconds(job.timeout_seconds) if job.timeout_seconds is not None else "—",
        ),
        ("Worker", f'<span data-field="worker_id">{_e(job.worker_id or "—")}</span>'),
        ("Idempotency key", _e(job.idempotency_key or "—")),
        ("Resources", resources_text),
        ("Submitted", _when(job.created_at)),
        ("Started", _when(job.started_at)),
        ("Finished", _when(job.finished_at)),
        ("Updated", _when(job.updated_at)),
        ("Ran for", _duration(job, now)),
    ]
    if job.cancel_requested:
        facts.append(("Cancel", "requested"))
    dl = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts)
    sections = [
        f'<p class="crumbs"><a href="{_e(links.home)}">&larr; All jobs</a></p>',
        # data-reload: the script reloads the page when the status changes, so
        # the error, assets and history shown are the server's.
        f'<div class="job-view" {_job_attrs(job)} data-reload>',
        f'<div class="job-head"><h1>{_e(job.task)}</h1><code>{_e(job.id)}</code>'
        f'{_status(job)}<div class="actions">{_buttons()}</div></div>',
        f'<div class="card detail-progress"><h2>Progress</h2>{_progress(job)}</div>',
    ]
    if job.error is not None:
        sections.append(_error_card(job.error))
    sections.append(
        '<div class="grid">'
        f'<div class="card"><h2>Job</h2><dl class="facts">{dl}</dl></div>'
        f'<div><div class="card"><h2>Params</h2><pre class="params-json">'
        f"{_e(_json(job.params))}</pre></div>"
        f'<div class="card"><h2>Assets</h2>{_assets(job)}</div></div></div>'
    )
    if job.errors:
        sections.append(_history(job.errors))
    sections.append("</div>")
    return "".join(sections)


def _error_card(error: ErrorInfo) -> str:
    facts = (
        f"<dt>Code</dt><dd>{_e(error.code)}</dd>"
        f"<dt>Type</dt><dd>{_e(error.type or '—')}</dd>"
        f"<dt>Stage</dt><dd>{_e(error.stage)}</dd>"
        f"<dt>Attempt</dt><dd>{error.attempt}</dd>"
        f"<dt>Retryable</dt><dd>{'yes' if error.retryable else 'no'}</dd>"
    )
    trace = (
        f"<h2>Traceback</h2><pre>{_e(error.traceback)}</pre>" if error.traceback else ""
    )
    return (
        '<div class="card error-card"><h2>Error</h2>'
        f'<p class="error-message">{_e(error.message)}</p>'
        f'<dl class="facts">{facts}</dl>{trace}</div>'
    )


def _assets(job: Job) -> str:
    if job.assets is None:
        none = "None." if job.status in TERMINAL_STATUSES else "None yet."
        return f'<p class="notice">{none}</p>'
    # Shown as JSON text, never as links: an href a task wrote could be a
    # javascript: URL.
    return f"<pre>{_e(_json(job.assets.model_dump(mode='json')))}</pre>"


def _history(errors: list[ErrorInfo]) -> str:
    rows = "".join(
        f"<tr><td>{error.attempt}</td><td>{_e(error.code)}</td>"
        f"<td>{_e(error.stage)}</td><td>{_e(error.type or '')}</td>"
        f"<td>{_e(error.message)}</td></tr>"
        for error in errors
    )
    return (
        '<div class="card"><h2>Error history</h2>'
        '<table class="errors"><thead><tr><th>Attempt</th><th>Code</th>'
        "<th>Stage</th><th>Type</th><th>Message</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></div>"
    )
