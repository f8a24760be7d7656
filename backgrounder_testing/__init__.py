"""Testing tools for task authors: a fake clock, simulated GPUs, a task harness."""

from __future__ import annotations

from backgrounder_testing.clock import FakeClock
from backgrounder_testing.gpus import SimulatedGPUs

__all__ = ["FakeClock", "SimulatedGPUs"]
