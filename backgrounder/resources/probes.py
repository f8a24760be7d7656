"""Resource probes: readings of host memory, CPU and GPUs, offered as plugins."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import psutil

from backgrounder.hookspecs import hookimpl

__all__ = ["GpuReading", "HostReading", "PsutilProbe", "ResourceProbe"]

logger = logging.getLogger(__name__)

_MB = 1024 * 1024


@dataclass(frozen=True)
class HostReading:
    """Host memory and CPU as a probe read them.

    Added in 0.1.
    """

    memory_total_mb: float
    memory_used_mb: float
    memory_available_mb: float
    cpu_percent: float


@dataclass(frozen=True)
class GpuReading:
    """One GPU as a probe read it; ``index`` is the device index jobs are given.

    Added in 0.1.
    """

    index: int
    name: str
    memory_total_mb: float
    memory_used_mb: float


@runtime_checkable
class ResourceProbe(Protocol):
    """Reads the host, or GPUs, or both (None where it does not read them).

    Reads are called on the event loop, at each admission and each
    ``_resources`` request, so they must return quickly: cache anything slow.
    A probe may also have ``open()`` and ``close()`` methods; the ResourceManager
    calls them (in a thread) when the JobManager starts and closes.

    Added in 0.1.
    """

    def read_host(self) -> HostReading | None:
        """Return host memory and CPU, or None if this probe does not read them."""
        ...

    def read_gpus(self) -> list[GpuReading] | None:
        """Return GPU readings, or None if this probe does not read GPUs."""
        ...


class PsutilProbe:
    """Host memory and CPU through psutil; reads no GPUs.

    CPU use is the share of busy CPU time between two readings at least
    ``min_sample_seconds`` apart (on every core together), computed from
    ``psutil.cpu_times()``: it never sleeps, and it does not disturb other users
    of ``psutil.cpu_percent()``. Before the first such interval it reports the
    average since boot.

    Added in 0.1.
    """

    def __init__(self, *, min_sample_seconds: float = 0.5) -> None:
        """Build a probe; nothing is read until ``read_host``."""
        self.min_sample_seconds = min_sample_seconds
        self._last: tuple[float, float] | None = None
        self._cpu_percent = 0.0

    def __repr__(self) -> str:
        return "PsutilProbe()"

    def open(self) -> None:
        """Take the first CPU sample."""
        self._sample_cpu()

    def read_host(self) -> HostReading:
        """Return the host's memory and its recent CPU use."""
        memory = psutil.virtual_memory()
        return HostReading(
            memory_total_mb=memory.total / _MB,
            memory_used_mb=(memory.total - memory.available) / _MB,
            memory_available_mb=memory.available / _MB,
            cpu_percent=self._sample_cpu(),
        )

    def read_gpus(self) -> list[GpuReading] | None:
        """Return None: psutil does not see GPUs."""
        return None

    def _sample_cpu(self) -> float:
        times = psutil.cpu_times()
        # On Linux guest time is already counted in user and nice time.
        total = sum(times) - getattr(times, "guest", 0.0)
        total -= getattr(times, "guest_nice", 0.0)
        idle = times.idle + getattr(times, "iowait", 0.0)
        if self._last is None:
            self._last = (total, idle)
            if total > 0:
                self._cpu_percent = _clamp(100.0 * (1 - idle / total))
            return self._cpu_percent
        last_total, last_idle = self._last
        elapsed = total - last_total
        if elapsed >= self.min_sample_seconds * (psutil.cpu_count() or 1):
            self._cpu_percent = _clamp(100.0 * (1 - (idle - last_idle) / elapsed))
            self._last = (total, idle)
        return self._cpu_percent


def _clamp(percent: float) -> float:
    return round(min(100.0, max(0.0, percent)), 1)


@hookimpl
def backgrounder_resource_probes() -> list[ResourceProbe]:
    """Offer the psutil host probe."""
    return [PsutilProbe()]
