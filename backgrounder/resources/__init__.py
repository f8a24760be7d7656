"""Resource limits, reservations and probes (host memory, CPU, GPUs)."""

from __future__ import annotations

from backgrounder.resources.limits import ResourceLimits
from backgrounder.resources.manager import Reservation, ResourceManager
from backgrounder.resources.probes import GpuReading, HostReading, ResourceProbe

__all__ = [
    "GpuReading",
    "HostReading",
    "Reservation",
    "ResourceLimits",
    "ResourceManager",
    "ResourceProbe",
]
