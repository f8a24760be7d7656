"""Testing tools for task authors: a fake clock, simulated GPUs, a task harness.

``pip install backgrounder[testing]`` also registers the pytest plugin
(``backgrounder_testing.plugin``) with its ``bg_*`` fixtures.
"""

from __future__ import annotations

from backgrounder_testing.clock import FakeClock
from backgrounder_testing.gpus import SimulatedGPUs
from backgrounder_testing.harness import TaskMistakeError, TaskResult, run_task
from backgrounder_testing.waiting import wait_for_job

__all__ = [
    "FakeClock",
    "SimulatedGPUs",
    "TaskMistakeError",
    "TaskResult",
    "run_task",
    "wait_for_job",
]
