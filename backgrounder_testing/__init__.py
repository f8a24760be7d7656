"""Testing tools for task authors: a fake clock, simulated GPUs, a task harness."""

from __future__ import annotations

from backgrounder_testing.clock import FakeClock

__all__ = ["FakeClock"]
