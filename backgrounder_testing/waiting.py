"""wait_for_job: follow a job's events until it reaches a status."""

from __future__ import annotations

import asyncio

from backgrounder.manager import JobManager
from backgrounder.models import Job, JobStatus

__all__ = ["wait_for_job"]


async def wait_for_job(
    manager: JobManager,
    job_id: str,
    *statuses: JobStatus | str,
    timeout_seconds: float = 10.0,
) -> Job:
    """Return the job once it reaches one of ``statuses`` (default: any final one).

    Follows ``manager.events(job_id)``, so it wakes on the change itself, never
    by polling. ``timeout_seconds`` is real time and only guards against a test
    that would hang: with a FakeClock, move the clock first, then wait.

    Raises:
        AssertionError: The job ended in another status, or nothing happened
            within ``timeout_seconds``.

    Added in 0.1.
    """
    wanted = {JobStatus(s) for s in statuses} or {
        JobStatus.done,
        JobStatus.failed,
        JobStatus.canceled,
    }
    job: Job | None = None
    try:
        async with asyncio.timeout(timeout_seconds):
            async for event in manager.events(job_id):
                job = event.job
                if job.status in wanted:
                    return job
    except TimeoutError:
        raise AssertionError(
            f"job {job_id} did not reach {_names(wanted)} within {timeout_seconds} s "
            f"of real time (last seen {job.status if job else 'nothing'}); if it "
            "sleeps on a FakeClock, advance the clock before waiting"
        ) from None
    last = job.status if job else "unknown"
    error = f" ({job.error.code}: {job.error.message})" if job and job.error else ""
    raise AssertionError(f"job {job_id} ended {last}{error}, not {_names(wanted)}")


def _names(statuses: set[JobStatus]) -> str:
    return " or ".join(sorted(s.value for s in statuses))
