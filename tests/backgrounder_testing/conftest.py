"""Fixtures for the tests of backgrounder_testing (pytester comes from addopts)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from backgrounder.hookspecs import hookimpl
from backgrounder.resources.probes import GpuReading


class StandInGPUs:
    """A stand-in for SimulatedGPUs while backgrounder_testing/gpus.py is not merged.

    Same constructor and ``set_used``; a resource-probe plugin.
    """

    def __init__(self, memory_mb: list[int], names: list[str] | None = None) -> None:
        self.memory_mb = list(memory_mb)
        self.names = names or [f"Simulated GPU {i}" for i in range(len(memory_mb))]
        self.used = [0] * len(memory_mb)

    def set_used(self, index: int, mb: int) -> None:
        self.used[index] = mb

    def read_host(self) -> None:
        return None

    def read_gpus(self) -> list[GpuReading]:
        return [
            GpuReading(index=i, name=n, memory_total_mb=t, memory_used_mb=u)
            for i, (n, t, u) in enumerate(
                zip(self.names, self.memory_mb, self.used, strict=True)
            )
        ]

    @hookimpl
    def backgrounder_resource_probes(self) -> list[Any]:
        return [self]


@pytest.fixture
def simulated_gpus(monkeypatch: pytest.MonkeyPatch) -> type[Any]:
    """SimulatedGPUs from backgrounder_testing.gpus, or the stand-in until it exists.

    With the stand-in, ``backgrounder_testing.gpus`` is made importable for the
    test (and for pytester runs in this process), then removed.
    """
    try:
        from backgrounder_testing.gpus import (  # type: ignore[import-not-found,unused-ignore]
            SimulatedGPUs,
        )
    except ImportError:
        module = types.ModuleType("backgrounder_testing.gpus")
        module.SimulatedGPUs = StandInGPUs  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "backgrounder_testing.gpus", module)
        return StandInGPUs
    return SimulatedGPUs  # type: ignore[no-any-return,unused-ignore]
