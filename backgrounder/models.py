"""The data backgrounder keeps about jobs, as pydantic v2 models."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "TERMINAL_STATUSES",
    "Assets",
    "ErrorCode",
    "ErrorInfo",
    "Job",
    "JobEvent",
    "JobPage",
    "JobRequest",
    "JobStatus",
    "Progress",
    "ResourceRequest",
    "Stage",
]


class JobStatus(StrEnum):
    """Where a job is in its life: queued → running → done | failed | canceled."""

    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    canceled = "canceled"


TERMINAL_STATUSES = frozenset({JobStatus.done, JobStatus.failed, JobStatus.canceled})


class Stage(StrEnum):
    """The stages a job walks through, in order."""

    idle = "idle"
    fetch = "fetch"
    preprocess = "preprocess"
    infer = "infer"
    postprocess = "postprocess"
    write = "write"
    cleanup = "cleanup"


class ErrorCode(StrEnum):
    """Why an attempt ended without success."""

    execution_error = "execution_error"
    timeout = "timeout"
    worker_lost = "worker_lost"
    resource_error = "resource_error"
    canceled = "canceled"


class Progress(BaseModel):
    """How far a job has got; ``updated_at`` shows when it last moved."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    percent: float = Field(0.0, ge=0, le=100, description="0 to 100.")
    stage: Stage = Field(Stage.idle, description="The stage the job is in.")
    processed: int = Field(0, ge=0, description="Items done in this stage.")
    total: int = Field(0, ge=0, description="Items in this stage, 0 when unknown.")
    message: str | None = Field(None, description="A short human-readable note.")
    updated_at: datetime | None = Field(
        None, description="When the runner last reported progress (UTC)."
    )


class Assets(BaseModel):
    """What a job produced: named groups of JSON values.

    ``Assets(custom={"output": {"href": "/data/report.json"}})`` is the usual shape;
    other named groups are allowed and kept as given.
    """

    model_config = ConfigDict(extra="allow")

    custom: dict[str, Any] = Field(
        default_factory=dict, description="Free-form outputs, JSON values."
    )

    def is_empty(self) -> bool:
        """Return True when no group holds anything."""
        return not any(self.model_dump().values())


class ErrorInfo(BaseModel):
    """Why an attempt failed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    code: ErrorCode = Field(description="The kind of failure.")
    message: str = Field(description="What went wrong, readable.")
    type: str | None = Field(None, description="The exception's class name, if any.")
    stage: Stage = Field(Stage.idle, description="The stage the job had reached.")
    retryable: bool = Field(False, description="Whether the worker would retry.")
    attempt: int = Field(1, ge=1, description="The attempt that failed.")
    traceback: str | None = Field(
        None, description="The traceback; over HTTP only when the app enables it."
    )


class ResourceRequest(BaseModel):
    """What a job needs to start: memory, GPU memory per device and GPU count."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_mb: int | None = Field(None, gt=0, description="Host memory, MB.")
    gpu_memory_mb: int | None = Field(None, gt=0, description="Memory per GPU, MB.")
    gpus: int | None = Field(
        None, ge=1, description="GPU count; 1 when gpu_memory_mb is set."
    )

    @model_validator(mode="after")
    def _default_gpus(self) -> ResourceRequest:
        if self.gpu_memory_mb is not None and self.gpus is None:
            object.__setattr__(self, "gpus", 1)
        return self

    def is_empty(self) -> bool:
        """Return True when the job asks for nothing."""
        return self.memory_mb is None and self.gpu_memory_mb is None and not self.gpus


class Job(BaseModel):
    """A job: the request, where it is, and what it produced."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="The job's id.")
    task: str = Field(description="The registered task that runs it.")
    params: dict[str, Any] = Field(default_factory=dict, description="JSON params.")
    status: JobStatus = Field(JobStatus.queued, description="Where the job is.")
    priority: int = Field(50, ge=0, le=100, description="0-100, higher runs first.")
    attempt: int = Field(
        1, ge=1, description="The attempt this job is on (1-based); retries add one."
    )
    retries: int = Field(
        0, ge=0, description="Automatic retries made since submission or last retry."
    )
    max_retries: int = Field(0, ge=0, description="Further attempts after a failure.")
    timeout_seconds: float | None = Field(
        None, description="Limit per attempt; null means none."
    )
    idempotency_key: str | None = Field(None, description="The submit's key, if any.")
    resources: ResourceRequest | None = Field(None, description="Requested resources.")
    progress: Progress = Field(default_factory=Progress, description="Progress.")
    assets: Assets | None = Field(None, description="Outputs; null means none yet.")
    error: ErrorInfo | None = Field(None, description="Why the last attempt failed.")
    errors: list[ErrorInfo] = Field(
        default_factory=list, description="Errors of earlier attempts, oldest first."
    )
    cancel_requested: bool = Field(False, description="A cancel is on its way.")
    worker_id: str | None = Field(None, description="Worker of the current attempt.")
    lease_expires_at: datetime | None = Field(
        None, description="When a running job's lease runs out unless renewed."
    )
    run_after: datetime | None = Field(
        None, description="A queued job does not start before this (retry backoff)."
    )
    created_at: datetime = Field(description="Submission time, UTC.")
    started_at: datetime | None = Field(None, description="Start of this attempt.")
    finished_at: datetime | None = Field(None, description="When it ended.")
    updated_at: datetime = Field(description="Last change, UTC.")

    @property
    def is_terminal(self) -> bool:
        """Return True for done, failed and canceled."""
        return self.status in TERMINAL_STATUSES


class JobRequest(BaseModel):
    """The body of ``POST /jobs``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    task: str = Field(min_length=1, description="The task to run.")
    params: dict[str, Any] = Field(default_factory=dict, description="JSON object.")
    priority: int = Field(50, ge=0, le=100, description="0-100, higher first.")
    timeout_seconds: float | None = Field(
        None,
        gt=0,
        strict=True,
        description="Seconds per attempt. Omit for the default; null for no limit.",
    )
    max_retries: int | None = Field(
        None,
        ge=0,
        le=1000,
        strict=True,
        description="Further attempts; omit for the default.",
    )
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=255, description="Replays return the same job."
    )
    resources: ResourceRequest | None = Field(None, description="What it needs.")

    @field_validator("priority", mode="before")
    @classmethod
    def _strict_int_priority(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"priority must be an integer 0-100 (got {value!r})")
        return value


class JobPage(BaseModel):
    """A page of jobs, newest first, and the cursor of the next page."""

    items: list[Job] = Field(description="The jobs on this page.")
    next_cursor: str | None = Field(None, description="Pass to get the next page.")


class JobEvent(BaseModel):
    """A lifecycle or progress event about one job."""

    model_config = ConfigDict(frozen=True)

    kind: str = Field(description="'status' or 'progress'.")
    job: Job = Field(description="The job as it is after the event.")
