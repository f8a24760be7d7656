"""Testing tools for task authors: a fake clock, simulated GPUs, a task harness.

``pip install backgrounder[testing]`` also registers the pytest plugin
(``backgrounder_testing.plugin``) with its ``bg_*`` fixtures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from backgrounder_testing.clock import FakeClock
from backgrounder_testing.harness import TaskMistakeError, TaskResult, run_task
from backgrounder_testing.waiting import wait_for_job

if TYPE_CHECKING:
    # gpus.py is written in parallel (#6); the ignore goes once it is merged.
    from backgrounder_testing.gpus import (  # type: ignore[import-not-found,unused-ignore]
        SimulatedGPUs,
    )

__all__ = [
    "FakeClock",
    "SimulatedGPUs",
    "TaskMistakeError",
    "TaskResult",
    "run_task",
    "wait_for_job",
]


def __getattr__(name: str) -> Any:
    # SimulatedGPUs lives in its own module, imported on first use.
    if name == "SimulatedGPUs":
        from backgrounder_testing.gpus import (  # type: ignore[import-not-found,unused-ignore]
            SimulatedGPUs,
        )

        return SimulatedGPUs
    raise AttributeError(f"module 'backgrounder_testing' has no attribute {name!r}")
