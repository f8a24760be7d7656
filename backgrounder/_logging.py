"""One helper for the ``extra`` of every log record about a job."""

from __future__ import annotations

from typing import Any

from backgrounder.models import Job

__all__ = ["job_log_extra"]


def job_log_extra(
    job: Job, *, event: str, worker_id: str | None = None, **more: Any
) -> dict[str, Any]:
    """Return ``extra`` naming the job, attempt, task, worker and a stable event key."""
    return {
        "job_id": job.id,
        "task": job.task,
        "attempt": job.attempt,
        "worker_id": worker_id or job.worker_id,
        "event": event,
        **more,
    }
