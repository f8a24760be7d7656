"""Resource probes: readings of host memory, CPU and GPUs, offered as plugins."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import psutil

from backgrounder.hookspecs import hookimpl

__all__ = ["GpuReading", "HostReading", "PsutilProbe", "ResourceProbe"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostReading:
    """Host memory and CPU as a probe read them."""

    memory_total_mb: float
    memory_used_mb: float
    memory_available_mb: float
    cpu_percent: float


@dataclass(frozen=True)
class GpuReading:
    """One GPU as a probe read it."""

    index: int
    name: str
    memory_total_mb: float
    memory_used_mb: float


@runtime_checkable
class ResourceProbe(Protocol):
    """Something that reads the host, or GPUs, or both (None where it cannot)."""

    def read_host(self) -> HostReading | None:
        """Return host memory and CPU, or None if this probe does not read them."""
        ...

    def read_gpus(self) -> list[GpuReading] | None:
        """Return GPU readings, or None if this probe does not read GPUs."""
        ...


class PsutilProbe:
    """Host memory and CPU through psutil; reads no GPUs."""

    def read_host(self) -> HostReading:
        """Return the host's memory and the CPU use since the last call."""
        memory = psutil.virtual_memory()
        mb = 1024 * 1024
        return HostReading(
            memory_total_mb=memory.total / mb,
            memory_used_mb=(memory.total - memory.available) / mb,
            memory_available_mb=memory.available / mb,
            cpu_percent=psutil.cpu_percent(interval=None),
        )

    def read_gpus(self) -> list[GpuReading] | None:
        """Return None: psutil does not see GPUs."""
        return None


@hookimpl
def backgrounder_resource_probes() -> list[ResourceProbe]:
    """Offer the psutil host probe."""
    return [PsutilProbe()]
