"""backgrounder: an async-first job queue for FastAPI apps that run ML and data work."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from backgrounder import errors
from backgrounder.clock import Clock, SystemClock
from backgrounder.errors import (
    BackgrounderError,
    ConfigurationError,
    JobCanceled,
    JobNotFoundError,
    JobStateError,
    NonRetryableError,
)
from backgrounder.hookspecs import hookimpl
from backgrounder.manager import JobManager
from backgrounder.models import (
    Assets,
    ErrorInfo,
    Job,
    JobPage,
    JobRequest,
    JobStatus,
    Progress,
    ResourceRequest,
    Stage,
)
from backgrounder.resources import ResourceLimits
from backgrounder.tasks import DEFAULT, NoopRunner, RunContext, Runner, TaskRegistry
from backgrounder.worker import Worker

if TYPE_CHECKING:
    from backgrounder.fastapi import setup_backgrounder

__all__ = [
    "DEFAULT",
    "Assets",
    "BackgrounderError",
    "Clock",
    "ConfigurationError",
    "ErrorInfo",
    "Job",
    "JobCanceled",
    "JobManager",
    "JobNotFoundError",
    "JobPage",
    "JobRequest",
    "JobStateError",
    "JobStatus",
    "NonRetryableError",
    "NoopRunner",
    "Progress",
    "ResourceLimits",
    "ResourceRequest",
    "RunContext",
    "Runner",
    "Stage",
    "SystemClock",
    "TaskRegistry",
    "Worker",
    "errors",
    "hookimpl",
    "setup_backgrounder",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The FastAPI layer is imported on first use, so the core stays light.
    if name == "setup_backgrounder":
        from backgrounder.fastapi import setup_backgrounder

        return setup_backgrounder
    raise AttributeError(f"module 'backgrounder' has no attribute {name!r}")
