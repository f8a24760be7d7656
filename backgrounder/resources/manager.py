"""ResourceManager: admit jobs when its request fits limits, free resources."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from backgrounder.errors import ResourceRequestError
from backgrounder.models import ResourceRequest
from backgrounder.resources.limits import ResourceLimits
from backgrounder.resources.probes import GpuReading, HostReading, ResourceProbe

__all__ = ["Reservation", "ResourceManager"]

logger = logging.getLogger(__name__)


@dataclass
class Reservation:
    """What one running job holds; released exactly once."""

    job_id: str
    memory_mb: int = 0
    gpu_memory_mb: int = 0
    gpus: list[int] = field(default_factory=list)
    released: bool = False


class ResourceManager:
    """Reservations of one worker process against its limits and probe readings.

    Invariant: ``_reserved_*`` are the sums over ``_reservations``; a reservation is
    added by ``try_reserve`` and removed by ``release`` once, whatever the ending.
    Every change sets ``_changed`` so a waiting claim loop looks again.
    """

    def __init__(
        self,
        limits: ResourceLimits | None = None,
        probes: list[ResourceProbe] = (),  # type: ignore[assignment]
    ) -> None:
        """Build a manager.

        Args:
            limits: The limits; None means only the probes' free memory counts.
            probes: Readers of host memory and CPU and of GPUs.
        """
        self.limits = limits or ResourceLimits()
        self.probes = list(probes)
        # Keyed by the reservation itself, not the job id: two attempts of one
        # job can hold reservations at once (a sync runner outliving its timeout).
        self._reservations: dict[int, Reservation] = {}
        self._changed = asyncio.Event()

    # ------------------------------------------------------------ readings

    def read_host(self) -> HostReading | None:
        """Return the first host reading a probe gives, or None."""
        for probe in self.probes:
            try:
                reading = probe.read_host()
            except Exception:
                logger.warning("probe %r failed to read the host", probe, exc_info=True)
                continue
            if reading is not None:
                return reading
        return None

    def read_gpus(self) -> list[GpuReading]:
        """Return every GPU the probes see, by index."""
        gpus: dict[int, GpuReading] = {}
        for probe in self.probes:
            try:
                readings = probe.read_gpus()
            except Exception:
                logger.warning("probe %r failed to read GPUs", probe, exc_info=True)
                continue
            for reading in readings or ():
                gpus.setdefault(reading.index, reading)
        return [gpus[i] for i in sorted(gpus)]

    # ------------------------------------------------------------ admission

    @property
    def running_jobs(self) -> int:
        """How many jobs hold a reservation."""
        return len(self._reservations)

    def reserved_memory_mb(self) -> int:
        """Host memory reserved by running jobs."""
        return sum(r.memory_mb for r in self._reservations.values())

    def reserved_gpu_memory_mb(self, index: int | None = None) -> int:
        """GPU memory reserved on one device (or all devices)."""
        return (
            sum(
                r.gpu_memory_mb
                for r in self._reservations.values()
                if index is None or index in r.gpus
            )
            if index is not None
            else sum(r.gpu_memory_mb * len(r.gpus) for r in self._reservations.values())
        )

    def check_submittable(self, request: ResourceRequest | None) -> None:
        """Raise ResourceRequestError if ``request`` could never be admitted here.

        Only what never changes counts: the limits and each device's total memory.
        """
        if request is None or request.is_empty():
            return
        limits = self.limits
        if request.memory_mb and limits.max_memory_mb:
            if request.memory_mb > limits.max_memory_mb:
                raise ResourceRequestError(
                    f"resources.memory_mb={request.memory_mb} exceeds the worker limit "
                    f"max_memory_mb={limits.max_memory_mb}; ask for less"
                )
        if request.gpu_memory_mb:
            if (
                limits.max_gpu_memory_mb
                and request.gpu_memory_mb > limits.max_gpu_memory_mb
            ):
                raise ResourceRequestError(
                    f"resources.gpu_memory_mb={request.gpu_memory_mb} exceeds the "
                    f"worker limit max_gpu_memory_mb={limits.max_gpu_memory_mb}"
                )
            gpus = self.read_gpus()
            fitting = [g for g in gpus if g.memory_total_mb >= request.gpu_memory_mb]
            wanted = request.gpus or 1
            if gpus and len(fitting) < wanted:
                biggest = max((g.memory_total_mb for g in gpus), default=0)
                raise ResourceRequestError(
                    f"resources asks for {wanted} GPU(s) with "
                    f"{request.gpu_memory_mb} MB each; this worker has {len(gpus)} "
                    f"GPU(s), the largest with {biggest:.0f} MB"
                )

    def try_reserve(
        self, job_id: str, request: ResourceRequest | None
    ) -> Reservation | None:
        """Reserve what the job asks for, or return None if it does not fit now."""
        limits = self.limits
        if (
            limits.max_concurrent_jobs
            and self.running_jobs >= limits.max_concurrent_jobs
        ):
            return None
        request = request or ResourceRequest()
        memory = request.memory_mb or 0
        if memory and limits.max_memory_mb:
            if self.reserved_memory_mb() + memory > limits.max_memory_mb:
                return None
        if limits.max_cpu_percent:
            host = self.read_host()
            if (
                host is not None
                and host.cpu_percent > limits.max_cpu_percent
                and self.running_jobs
            ):
                return None
        gpus: list[int] = []
        if request.gpu_memory_mb:
            gpus = self._pick_gpus(request.gpu_memory_mb, request.gpus or 1)
            if not gpus:
                return None
        reservation = Reservation(
            job_id=job_id,
            memory_mb=memory,
            gpu_memory_mb=request.gpu_memory_mb or 0,
            gpus=gpus,
        )
        self._reservations[id(reservation)] = reservation
        self._changed.set()
        return reservation

    def _pick_gpus(self, memory_mb: int, count: int) -> list[int]:
        free: list[tuple[float, int]] = []
        for gpu in self.read_gpus():
            reserved = self.reserved_gpu_memory_mb(gpu.index)
            cap = gpu.memory_total_mb
            if self.limits.max_gpu_memory_mb:
                cap = min(cap, self.limits.max_gpu_memory_mb)
            available = min(
                cap - reserved, gpu.memory_total_mb - max(gpu.memory_used_mb, reserved)
            )
            if available >= memory_mb:
                free.append((available, gpu.index))
        if len(free) < count:
            return []
        free.sort(reverse=True)
        return sorted(index for _, index in free[:count])

    def release(self, reservation: Reservation | None) -> None:
        """Give back a reservation; a second release does nothing."""
        if reservation is None or reservation.released:
            return
        reservation.released = True
        self._reservations.pop(id(reservation), None)
        self._changed.set()

    async def wait_changed(self, seconds: float) -> None:
        """Wait until a reservation is released or taken, at most ``seconds``."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    def snapshot(self) -> dict[str, Any]:
        """Return the ``_resources`` report: limits, usage, reserved, jobs, GPUs."""
        host = self.read_host()
        gpus = self.read_gpus()
        return {
            "limits": self.limits.model_dump(),
            "usage": {
                "memory_used_mb": round(host.memory_used_mb, 1) if host else None,
                "memory_total_mb": round(host.memory_total_mb, 1) if host else None,
                "cpu_percent": host.cpu_percent if host else None,
            },
            "reserved": {
                "memory_mb": self.reserved_memory_mb(),
                "gpu_memory_mb": self.reserved_gpu_memory_mb(),
            },
            "running_jobs": self.running_jobs,
            "gpus": [
                {
                    "index": g.index,
                    "name": g.name,
                    "memory_total_mb": g.memory_total_mb,
                    "memory_used_mb": g.memory_used_mb,
                    "memory_reserved_mb": self.reserved_gpu_memory_mb(g.index),
                }
                for g in gpus
            ],
        }
