"""Process isolation: run sync, CPU and GPU tasks in child processes (#7)."""

from __future__ import annotations

from backgrounder.isolation.errors import (
    ChildProcessLostError,
    ChildSetupError,
    ChildTaskError,
    ProcessIsolationError,
)
from backgrounder.isolation.runner import (
    ISOLATION_MODES,
    ProcessRunner,
    close_process_runners,
    isolate,
)

__all__ = [
    "ISOLATION_MODES",
    "ChildProcessLostError",
    "ChildSetupError",
    "ChildTaskError",
    "ProcessIsolationError",
    "ProcessRunner",
    "close_process_runners",
    "isolate",
]
