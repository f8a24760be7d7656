"""The router factory: every route of the HTTP contract under ``/jobs``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.params import Depends as DependsParam
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field

from backgrounder._json import json_type
from backgrounder.errors import InvalidParamsError, JobNotFoundError, SubmitError
from backgrounder.fastapi._errors import (
    BackgrounderRoute,
    BodyTooLargeError,
    ManagerUnavailableError,
)
from backgrounder.manager import JobManager
from backgrounder.metrics import CONTENT_TYPE, PrometheusMetrics
from backgrounder.models import Assets, Job, JobPage, JobRequest, JobStatus
from backgrounder.tasks import DEFAULT

__all__ = [
    "STATE_KEY",
    "ErrorBody",
    "HealthReport",
    "ResourcesReport",
    "create_router",
    "event_id",
    "get_manager",
]

logger = logging.getLogger(__name__)

#: The ``app.state`` attribute that holds the app's JobManager.
STATE_KEY = "backgrounder"

#: Room for the request's other fields on top of max_params_bytes.
BODY_MARGIN_BYTES = 64 * 1024


class ErrorBody(BaseModel):
    """Every error answer: what went wrong and what to do about it."""

    detail: str = Field(description="What failed and how to fix it.")


class HealthReport(BaseModel):
    """The ``_health`` answer: store, queue and worker status."""

    model_config = {"extra": "allow"}

    ok: bool = Field(description="False when any component is down (answered 503).")
    store: dict[str, Any] = Field(description="The store: name, ok, error.")
    queue: dict[str, Any] = Field(description="The queue: name, ok, error.")
    worker: dict[str, Any] = Field(
        description="This process's workers: ok, alive, running, zombies, error."
    )


class ResourcesReport(BaseModel):
    """The ``_resources`` answer: limits, usage and reservations of this process."""

    limits: dict[str, Any] = Field(description="The ResourceLimits fields.")
    usage: dict[str, Any] = Field(
        description="memory_used_mb, memory_total_mb, cpu_percent (null if unknown)."
    )
    reserved: dict[str, Any] = Field(
        description="memory_mb and gpu_memory_mb held by running jobs."
    )
    running_jobs: int = Field(description="Jobs holding a reservation now.")
    gpus: list[dict[str, Any]] = Field(
        description="index, name, memory_total_mb, memory_used_mb, memory_reserved_mb."
    )


def _find_manager(request: Request) -> JobManager:
    manager = getattr(request.app.state, STATE_KEY, None)
    if not isinstance(manager, JobManager):
        raise ManagerUnavailableError(
            "backgrounder is not set up on this app: call "
            "setup_backgrounder(app, ...) instead of mounting the router alone, so "
            "the app's lifespan starts a JobManager and its workers"
        )
    return manager


def get_manager(request: Request) -> JobManager:
    """Return the app's started JobManager: a FastAPI dependency for routes.

    Raises:
        ManagerUnavailableError: setup_backgrounder was not called, the app's
            lifespan has not started the manager, or it is shutting down (503).
    """
    manager = _find_manager(request)
    if not manager.started:
        raise ManagerUnavailableError(
            "the job manager is not running: it is shutting down, or the app's "
            "lifespan has not started it (serve the app with uvicorn, or enter its "
            "lifespan in tests); try again shortly"
        )
    return manager


Manager = Annotated[JobManager, Depends(get_manager)]


async def _existing_job(job_id: str, manager: Manager) -> Job:
    return await manager.get(job_id)


def _public(job: Job, manager: JobManager) -> Job:
    """Return ``job`` without tracebacks unless the app exposes them."""
    if manager.settings.expose_tracebacks:
        return job
    update: dict[str, Any] = {}
    if job.error is not None and job.error.traceback is not None:
        update["error"] = job.error.model_copy(update={"traceback": None})
    if any(e.traceback is not None for e in job.errors):
        update["errors"] = [
            e.model_copy(update={"traceback": None}) for e in job.errors
        ]
    return job.model_copy(update=update) if update else job


def event_id(job: Job) -> str:
    """Return the SSE id of the job's state: ``attempt-microseconds``.

    The stamp is the later of the job's last change and its last progress, so
    it grows with every event of an attempt.
    """
    stamp = job.updated_at
    if job.progress.updated_at is not None and job.progress.updated_at > stamp:
        stamp = job.progress.updated_at
    return f"{job.attempt}-{int(stamp.timestamp() * 1_000_000)}"


# ---------------------------------------------------------------- POST /jobs body


async def _read_body(request: Request, limit: int, params_limit: int) -> bytes:
    """Read the body as a stream, refusing it as soon as it passes ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(limit, params_limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError(limit, params_limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_constant(name: str) -> Any:
    raise InvalidParamsError(
        f"the body holds {name}, which JSON does not allow; send a finite number "
        "or null"
    )


def _parse_request(body: bytes, max_depth: int) -> tuple[JobRequest, dict[str, Any]]:
    """Decode and validate a ``POST /jobs`` body; return the model and raw keys."""
    if not body.strip():
        raise SubmitError(
            'the body is empty; send a JSON object such as {"task": "noop"}'
        )
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidParamsError(
            f"the body is nested too deeply to read; params may nest at most "
            f"{max_depth} levels (max_params_depth)"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SubmitError(
            f"the body is not valid JSON ({exc}); send a JSON object such as "
            '{"task": "noop", "params": {}}'
        ) from None
    if not isinstance(data, dict):
        raise SubmitError(
            f"the body must be a JSON object (got {json_type(data)}); send "
            '{"task": "...", "params": {...}}'
        )
    if "params" in data and not isinstance(data["params"], dict):
        raise InvalidParamsError(
            "params must be a JSON object (got "
            f"{json_type(data['params'])}); wrap the value, for example "
            '{"items": [...]}'
        )
    return JobRequest.model_validate(data), data


# ---------------------------------------------------------------- the router


def create_router(
    *,
    dependencies: Sequence[DependsParam] | None = None,
    dashboard: bool = False,
    metrics: PrometheusMetrics | None = None,
) -> APIRouter:
    """Return an APIRouter with every backgrounder route under ``/jobs``.

    Include it with a prefix (``setup_backgrounder`` uses ``/api/v1``). The app
    must run ``setup_backgrounder`` so a JobManager is started; without it every
    route answers 503 saying so.

    Args:
        dependencies: FastAPI dependencies run before every route, such as the
            app's authentication.
        dashboard: Serve the dashboard pages at ``/jobs/_dashboard``.
        metrics: Serve these metrics at ``/jobs/_metrics`` in the Prometheus
            text format; the plugin must also be registered on the manager.

    Returns:
        The router. Errors are answered from one table (``ERROR_STATUS``) as JSON
        ``{"detail": "..."}``.
    """
    router = APIRouter(
        prefix="/jobs",
        tags=["jobs"],
        dependencies=list(dependencies or ()),
        route_class=BackgrounderRoute,
        responses={503: {"model": ErrorBody, "description": "Not serving."}},
    )
    _add_submit(router)
    _add_listing(router)
    _add_service_routes(router)
    # Optional routes, also declared before "/{job_id}".
    if metrics is not None:
        _add_metrics_route(router, metrics)
    if dashboard:
        # Imported here: the dashboard module uses this module's get_manager.
        from backgrounder.fastapi.dashboard import add_dashboard_routes

        add_dashboard_routes(router)
    _add_job_routes(router)
    return router


def _add_metrics_route(router: APIRouter, metrics: PrometheusMetrics) -> None:
    @router.get(
        "/_metrics",
        name="backgrounder_metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def prometheus_metrics(manager: Manager) -> Response:
        """Return job counters, durations and gauges in the Prometheus text format."""
        return Response(await metrics.render(manager), media_type=CONTENT_TYPE)


def _add_submit(router: APIRouter) -> None:
    schema = JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)

    @router.post(
        "",
        name="backgrounder_submit_job",
        summary="Submit a job",
        status_code=202,
        response_model=Job,
        responses={
            200: {"model": Job, "description": "The idempotency key matched a job."},
            202: {"description": "Stored and queued; Location names the job."},
            409: {"model": ErrorBody, "description": "Key reused for another job."},
            413: {"model": ErrorBody, "description": "Params too large."},
            422: {"model": ErrorBody, "description": "Unknown task or bad fields."},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": schema}},
            }
        },
    )
    async def submit_job(
        request: Request,
        manager: Manager,
        idempotency_key_header: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                description="Same as the body's idempotency_key.",
            ),
        ] = None,
    ) -> Response:
        """Store a job and queue it; replaying an idempotency key returns it."""
        settings = manager.settings
        body = await _read_body(
            request,
            settings.max_params_bytes + BODY_MARGIN_BYTES,
            settings.max_params_bytes,
        )
        job_request, raw = _parse_request(body, settings.max_params_depth)
        key = job_request.idempotency_key
        if idempotency_key_header is not None:
            idempotency_key_header = _header_text(
                "Idempotency-Key", idempotency_key_header
            )
            if key is not None and key != idempotency_key_header:
                raise SubmitError(
                    f"the Idempotency-Key header ({idempotency_key_header!r}) and "
                    f"the body's idempotency_key ({key!r}) differ; send one of them"
                )
            key = idempotency_key_header
        job, created = await manager.submit_or_get(
            job_request.task,
            job_request.params,
            priority=job_request.priority,
            timeout_seconds=(
                job_request.timeout_seconds if "timeout_seconds" in raw else DEFAULT
            ),
            max_retries=job_request.max_retries,
            idempotency_key=key,
            resources=job_request.resources,
        )
        location = str(request.url_for("backgrounder_get_job", job_id=job.id))
        return JSONResponse(
            _public(job, manager).model_dump(mode="json"),
            status_code=202 if created else 200,
            headers={"Location": location},
        )


def _header_text(name: str, value: str) -> str:
    """Return a header's value as the client wrote it.

    HTTP carries header values as bytes and Starlette reads them as latin-1, so
    a key a client sent as UTF-8 ("clé") would arrive garbled ("clÃ©"), differ
    from the same key sent in the body, and show garbled in every reply.
    """
    raw = value.encode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SubmitError(
            f"the {name} header is not UTF-8 text ({raw!r}); send it as UTF-8, "
            "or as the body's idempotency_key"
        ) from None


def _add_listing(router: APIRouter) -> None:
    @router.get(
        "",
        name="backgrounder_list_jobs",
        summary="List jobs, newest first",
        response_model=JobPage,
        responses={422: {"model": ErrorBody, "description": "A bad filter."}},
    )
    async def list_jobs(
        manager: Manager,
        status: Annotated[
            str | None,
            Query(description=f"Only jobs in this status: {', '.join(JobStatus)}."),
        ] = None,
        task: Annotated[str | None, Query(description="Only this task.")] = None,
        limit: Annotated[int, Query(description="Page size, 1-1000.")] = 50,
        cursor: Annotated[
            str | None, Query(description="next_cursor of the previous page.")
        ] = None,
    ) -> JobPage:
        """Return a page of jobs, newest first, and the cursor of the next page."""
        page = await manager.list(status=status, task=task, limit=limit, cursor=cursor)
        return JobPage(
            items=[_public(job, manager) for job in page.items],
            next_cursor=page.next_cursor,
        )


def _add_service_routes(router: APIRouter) -> None:
    # Declared before "/{job_id}" so that no job id can shadow them.
    @router.get(
        "/_health",
        name="backgrounder_health",
        summary="Store, queue and worker status",
        response_model=HealthReport,
        responses={503: {"model": HealthReport, "description": "Something is down."}},
    )
    async def health(request: Request) -> JSONResponse:
        """Answer 200 when store, queue and workers are fine, else 503 naming them."""
        manager = _find_manager(request)
        report = await manager.health()
        if not manager.started:
            report["ok"] = False
            report["manager"] = {
                "ok": False,
                "error": "the job manager is not running (starting or shutting down)",
            }
        return JSONResponse(report, status_code=200 if report["ok"] else 503)

    @router.get(
        "/_resources",
        name="backgrounder_resources",
        summary="Resource limits, usage and reservations",
        response_model=ResourcesReport,
    )
    async def resources(manager: Manager) -> dict[str, Any]:
        """Return this process's limits, host usage, reservations and GPUs."""
        return manager.resources.snapshot()


def _add_job_routes(router: APIRouter) -> None:
    not_found: dict[int | str, dict[str, Any]] = {
        404: {"model": ErrorBody, "description": "No job has that id."}
    }
    conflict: dict[int | str, dict[str, Any]] = {
        409: {"model": ErrorBody, "description": "Wrong state."}
    }

    @router.get(
        "/{job_id}",
        name="backgrounder_get_job",
        summary="Get a job",
        response_model=Job,
        responses=not_found,
    )
    async def get_job(job_id: str, manager: Manager) -> Job:
        """Return the job whole: status, progress, error, assets, timestamps."""
        return _public(await manager.get(job_id), manager)

    @router.post(
        "/{job_id}/cancel",
        name="backgrounder_cancel_job",
        summary="Cancel a job",
        response_model=Job,
        responses={**not_found, **conflict},
    )
    async def cancel_job(job_id: str, manager: Manager) -> Job:
        """Cancel a queued job at once, or ask a running one to stop."""
        return _public(await manager.cancel(job_id), manager)

    @router.post(
        "/{job_id}/retry",
        name="backgrounder_retry_job",
        summary="Retry a failed or canceled job",
        response_model=Job,
        responses={**not_found, **conflict},
    )
    async def retry_job(job_id: str, manager: Manager) -> Job:
        """Queue a failed or canceled job again as its next attempt."""
        return _public(await manager.retry(job_id), manager)

    @router.get(
        "/{job_id}/assets",
        name="backgrounder_job_assets",
        summary="Get a done job's outputs",
        response_model=Assets,
        responses={**not_found, **conflict},
    )
    async def job_assets(job_id: str, manager: Manager) -> Assets:
        """Return what the job produced, once it is done."""
        return await manager.assets(job_id)

    @router.get(
        "/{job_id}/events",
        name="backgrounder_job_events",
        summary="Stream a job's status and progress",
        response_class=EventSourceResponse,
        responses=not_found,
    )
    async def job_events(
        job: Annotated[Job, Depends(_existing_job)],
        manager: Manager,
        last_event_id: Annotated[
            str | None,
            Header(
                alias="Last-Event-ID",
                description="Sent on reconnect; the current state comes first.",
            ),
        ] = None,
    ) -> AsyncIterator[ServerSentEvent]:
        """Send the job's state now, then each change, until it ends.

        Each event is ``status`` or ``progress``, its data the job as JSON, its id
        ``attempt-microseconds``. A client that reconnects (with Last-Event-ID or
        not) gets the current state at once, so nothing still current is missed.
        """
        if last_event_id is not None:
            logger.debug("job %s: event stream resumed after %s", job.id, last_event_id)
        try:
            async for event in manager.events(job.id):
                public = _public(event.job, manager)
                yield ServerSentEvent(
                    data=public.model_dump(mode="json"),
                    event=event.kind,
                    id=event_id(public),
                )
        except JobNotFoundError:
            return
