"""Exceptions raised by backgrounder.

The tree::

    BackgrounderError
    ├── ConfigurationError (also ValueError)
    ├── PluginError
    ├── JobError                      carries job_id
    │   ├── JobNotFoundError (also LookupError)
    │   ├── JobStateError             the job is in the wrong state for the call
    │   ├── JobTimeoutError (also TimeoutError)
    │   └── JobCanceled               raised inside a runner by ctx.check_canceled()
    ├── SubmitError (also ValueError) a submission is refused; nothing was stored
    │   ├── UnknownTaskError
    │   ├── InvalidParamsError        params are not a JSON object, or hold non-JSON
    │   ├── ParamsTooLargeError
    │   ├── ResourceRequestError      the request can never fit the limits
    │   └── IdempotencyConflictError  the key was used for another request
    ├── BackendError
    │   ├── StoreError
    │   │   └── CorruptJobError       a stored job cannot be read back
    │   └── QueueError
    ├── ResourceError
    └── NonRetryableError             raised by a runner to fail without retries
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackgrounderError",
    "ConfigurationError",
    "CorruptJobError",
    "IdempotencyConflictError",
    "InvalidParamsError",
    "JobCanceled",
    "JobError",
    "JobNotFoundError",
    "JobStateError",
    "JobTimeoutError",
    "NonRetryableError",
    "ParamsTooLargeError",
    "PluginError",
    "QueueError",
    "ResourceError",
    "ResourceRequestError",
    "StoreError",
    "SubmitError",
    "UnknownTaskError",
]


class BackgrounderError(Exception):
    """Raised for every error backgrounder reports; the root of the tree."""


class ConfigurationError(BackgrounderError, ValueError):
    """Raised when an option, URL or plugin set-up cannot be honoured."""


class PluginError(BackgrounderError):
    """Raised when a plugin's hook implementation fails where it must not."""


class JobError(BackgrounderError):
    """Raised for an error about one job; ``job_id`` names it."""

    def __init__(self, message: str, *, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobNotFoundError(JobError, LookupError):
    """Raised when no job has the given id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"job {job_id!r} not found; check the id returned by submit",
            job_id=job_id,
        )


class JobStateError(JobError):
    """Raised when a job is in the wrong state for the call (cancel a done job)."""

    def __init__(self, message: str, *, job_id: str, status: str) -> None:
        super().__init__(message, job_id=job_id)
        self.status = status


class JobTimeoutError(JobError, TimeoutError):
    """Raised when a job ran longer than its ``timeout_seconds``."""


class JobCanceled(JobError):
    """Raised inside a runner by ``ctx.check_canceled()`` once a cancel is requested.

    Let it propagate: the worker then ends the job ``canceled``.
    """


class SubmitError(BackgrounderError, ValueError):
    """Raised when a submission is refused; nothing was stored."""


class UnknownTaskError(SubmitError):
    """Raised when the task name is not in the registry."""

    def __init__(self, task: str, known: list[str]) -> None:
        names = ", ".join(repr(n) for n in sorted(known)) or "none"
        super().__init__(
            f"unknown task {task!r}; registered tasks: {names}. "
            "Add it with registry.add(name, runner)."
        )
        self.task = task
        self.known = sorted(known)


class InvalidParamsError(SubmitError):
    """Raised when params are not a JSON object or hold a value JSON cannot carry."""

    def __init__(self, message: str, *, path: str = "params") -> None:
        super().__init__(message)
        self.path = path


class ParamsTooLargeError(SubmitError):
    """Raised when params encode to more JSON bytes than the limit allows."""

    def __init__(self, size: int | None, limit: int) -> None:
        got = f"{size} bytes" if size is not None else "more than that"
        super().__init__(
            f"params are too large: {got} of JSON, the limit is {limit} bytes "
            "(max_params_bytes). Store large inputs elsewhere and pass a reference."
        )
        self.size = size
        self.limit = limit


class ResourceRequestError(SubmitError):
    """Raised when a job asks for resources that no device or limit could hold."""


class IdempotencyConflictError(SubmitError):
    """Raised when an idempotency key was used before for a different request."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used by job {job_id!r} with a "
            "different task or params; use a new key for a new request"
        )
        self.key = key
        self.job_id = job_id


class BackendError(BackgrounderError):
    """Raised when a store or queue backend fails (unreachable, read-only, full)."""


class StoreError(BackendError):
    """Raised when the job store fails; the message names the store."""


class CorruptJobError(StoreError):
    """Raised when a stored job cannot be read back as a Job.

    Its record was changed outside backgrounder (or is damaged): a field holds
    something that is not that field's kind of value. Reads of many jobs leave it
    out and log it; reading it alone raises this.
    """

    def __init__(self, job_id: str, store: str, cause: BaseException) -> None:
        reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        super().__init__(
            f"job {job_id!r} in {store} cannot be read: {reason}; repair or delete "
            "its stored record"
        )
        self.job_id = job_id


class QueueError(BackendError):
    """Raised when the queue fails; the message names the queue."""


class ResourceError(BackgrounderError):
    """Raised when resources cannot be probed or reserved."""


class NonRetryableError(BackgrounderError):
    """Raised by a runner to fail the job at once, whatever retries it has left."""
