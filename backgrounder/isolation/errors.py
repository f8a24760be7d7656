"""Exceptions a process-isolated attempt ends with, as the worker records them."""

from __future__ import annotations

import signal
from typing import Any

from backgrounder.errors import BackgrounderError, JobError, NonRetryableError
from backgrounder.models import ErrorCode

__all__ = [
    "ChildProcessLostError",
    "ChildSetupError",
    "ChildTaskError",
    "ProcessIsolationError",
]


class ProcessIsolationError(BackgrounderError):
    """Raised when a child process cannot be started or talked to."""


class ChildProcessLostError(JobError):
    """Raised when the child process running a job ends on its own.

    A segfault, ``os._exit``, the out-of-memory killer or a SIGKILL from outside
    all end the attempt this way. The worker records error code ``worker_lost``
    (read from ``error_code``) and retries the job per its policy; the next
    attempt runs in a new child process.
    """

    error_code = ErrorCode.worker_lost

    def __init__(self, *, job_id: str, pid: int | None, exitcode: int | None) -> None:
        super().__init__(
            f"the child process {pid} running job {job_id!r} {_how_it_ended(exitcode)}"
            " before the attempt finished",
            job_id=job_id,
        )
        self.pid = pid
        self.exitcode = exitcode


class ChildTaskError(JobError):
    """Raised in the worker when the runner raised in its child process.

    The exception itself stays in the child (nothing is pickled); ``remote_type``
    names its class, the message is its text, and the child's traceback is added
    as a note, so the stored traceback shows where it was raised. Each instance
    belongs to a subclass named after the remote class, so the job's
    ``error.type`` reads ``ValueError``, not ``ChildTaskError``.
    """

    def __init__(
        self,
        message: str,
        *,
        job_id: str,
        remote_type: str,
        remote_traceback: str | None = None,
    ) -> None:
        super().__init__(message, job_id=job_id)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        if remote_traceback:
            self.add_note(f"Raised in the child process:\n{remote_traceback}")


class ChildSetupError(ChildTaskError):
    """Raised when the task's ``setup()`` failed in a new child process."""


def remote_error(job_id: str, described: dict[str, Any], *, setup: bool) -> JobError:
    """Build the exception the worker sees for one the child reported.

    Args:
        job_id: The job the attempt belongs to.
        described: The child's description: type, message, traceback, retryable.
        setup: True when ``setup()`` raised, not ``execute``.
    """
    name = str(described.get("type") or "Exception")
    base: type[ChildTaskError] = ChildSetupError if setup else ChildTaskError
    bases: tuple[type[BaseException], ...] = (base,)
    if not described.get("retryable", True):
        bases = (base, NonRetryableError)
    # A class per failure named after the remote one; the worker stores
    # type(exc).__name__ as error.type.
    kind = type(name, bases, {"__module__": __name__, "__qualname__": name})
    message = str(described.get("message") or name)
    if setup:
        message = f"setup() failed in the child process: {name}: {message}"
    error = kind(
        message,
        job_id=job_id,
        remote_type=str(described.get("qualname") or name),
        remote_traceback=described.get("traceback"),
    )
    assert isinstance(error, ChildTaskError)
    return error


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "ended with an unknown status"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = (
            " (SIGKILL from outside, often the out-of-memory killer)"
            if -exitcode == signal.SIGKILL
            else ""
        )
        return f"was killed by {name}{hint}"
    return f"exited with code {exitcode}"
