"""The models' public contract: names, spellings, order, and time zones."""

from __future__ import annotations

from datetime import UTC, datetime

from backgrounder import JobStatus, Stage
from backgrounder.models import ErrorCode, Job, JobRequest


def test_status_stage_and_error_code_spellings() -> None:
    """StrEnums whose values are their names, in DESIGN.md's order and spelling."""
    assert list(JobStatus) == ["queued", "running", "done", "failed", "canceled"]
    assert list(Stage) == [
        "idle",
        "fetch",
        "preprocess",
        "infer",
        "postprocess",
        "write",
        "cleanup",
    ]
    assert {c.value for c in ErrorCode} == {
        "execution_error",
        "timeout",
        "worker_lost",
        "resource_error",
        "canceled",
    }
    assert JobStatus.done == "done"


def test_job_json_has_aware_utc_timestamps() -> None:
    """A job's timestamps serialise as ISO 8601 with a UTC offset."""
    now = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    job = Job(id="j", task="t", created_at=now, updated_at=now)

    again = Job.model_validate_json(job.model_dump_json())

    assert again.created_at == now
    assert again.created_at.utcoffset() is not None
    assert job.attempt == 1


def test_job_request_keeps_explicit_zeros() -> None:
    """priority 0 and max_retries 0 are values, not 'unset'."""
    request = JobRequest(task="t", priority=0, max_retries=0)

    assert (request.priority, request.max_retries) == (0, 0)
