"""ResourceManager: admit a job when its request fits, and give resources back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from backgrounder.clock import Clock, SystemClock
from backgrounder.errors import ResourceRequestError
from backgrounder.models import ResourceRequest
from backgrounder.resources.limits import ResourceLimits
from backgrounder.resources.probes import GpuReading, HostReading, ResourceProbe

__all__ = ["Reservation", "ResourceManager", "WaitInfo"]

logger = logging.getLogger(__name__)


@dataclass
class Reservation:
    """What one running job holds; released exactly once.

    ``gpus`` are the device indexes the job was given (``ctx.gpus``);
    ``gpu_memory_mb`` is reserved on each of them.

    Added in 0.1.
    """

    job_id: str
    memory_mb: int = 0
    gpu_memory_mb: int = 0
    gpus: list[int] = field(default_factory=list)
    released: bool = False


@dataclass(frozen=True)
class WaitInfo:
    """Why a job was not admitted, and how long it has been waiting.

    Added in 0.1.
    """

    job_id: str
    reason: str
    refusals: int
    waited_seconds: float
    starving: bool


@dataclass
class _Waiter:
    """A job that was refused and may come back: the memory of the wait."""

    job_id: str
    request: ResourceRequest
    priority: int
    since: float
    last_seen: float
    refusals: int = 0
    woken: bool = False
    reason: str = ""


@dataclass
class _Ledger:
    """What is taken, for one admission decision: reservations plus holds."""

    jobs: int
    memory_mb: int
    gpu: dict[int, int]


class ResourceManager:
    """Reservations of one worker process against its limits and probe readings.

    **Admission.** A job is admitted when, with the reservations of the running
    jobs counted, it fits every limit and what the probes report free: one more
    job within ``max_concurrent_jobs``; its ``memory_mb`` within
    ``max_memory_mb`` and within the host's free memory (total minus the larger
    of what the host uses and what jobs reserved); no start while the host's CPU
    is above ``max_cpu_percent``; and ``gpus`` devices that each have
    ``gpu_memory_mb`` free (total minus the larger of used and reserved, and
    within ``max_gpu_memory_mb``), the freest first.

    **Waiting, without blocking or starving.** A refused job is remembered as
    *waiting* and handed back to the queue by the worker; smaller jobs behind it
    are admitted meanwhile. When resources are released, ``wakeable()`` names
    the waiting jobs that fit now so the worker makes them claimable at once.
    Once a job has waited ``starvation_seconds``, it *holds* what it asked for:
    every job that started waiting after it (newcomers included) is admitted
    only if it still fits with the held request counted as reserved (one job,
    its memory, and its GPU memory on the devices it would get). So a big job
    waits at most until the running jobs in its way end.

    **Invariant.** ``_reservations`` holds exactly the running jobs' requests:
    ``try_reserve`` adds one, ``release`` removes it once (a second release does
    nothing), and every release sets ``_changed``. A job is in ``_waiting`` only
    between a refusal and its admission, its ``forget``, or its going stale
    (not seen for ``stale_seconds``: canceled, or taken by another process).

    Added in 0.1.
    """

    def __init__(
        self,
        limits: ResourceLimits | None = None,
        probes: Iterable[ResourceProbe] = (),
        *,
        clock: Clock | None = None,
        starvation_seconds: float = 60.0,
        recheck_seconds: float = 1.0,
        recheck_max_seconds: float = 10.0,
    ) -> None:
        """Build a manager.

        Args:
            limits: The limits; None means only the probes' free memory counts.
            probes: Readers of host memory and CPU and of GPUs. The first probe
                with a host reading gives the host, the first probe that reads
                GPUs gives the GPUs (plugins registered last come first).
            clock: The clock for waiting times and waits.
            starvation_seconds: How long a job waits before it holds what it needs.
            recheck_seconds: First delay before a refused job is looked at again.
            recheck_max_seconds: Longest such delay (it doubles per refusal).
        """
        self.limits = limits or ResourceLimits()
        self.probes = list(probes)
        self.clock: Clock = clock or SystemClock()
        self.starvation_seconds = starvation_seconds
        self.recheck_seconds = recheck_seconds
        self.recheck_max_seconds = recheck_max_seconds
        # Keyed by the reservation itself, not the job id: two attempts of one
        # job can hold reservations at once (a sync runner outliving its timeout).
        self._reservations: dict[int, Reservation] = {}
        self._waiting: dict[str, _Waiter] = {}
        self._changed = asyncio.Event()
        self._failed_probes: set[int] = set()

    def __repr__(self) -> str:
        return (
            f"ResourceManager(running={len(self._reservations)}, "
            f"waiting={len(self._waiting)}, limits={self.limits!r})"
        )

    @property
    def stale_seconds(self) -> float:
        """How long a waiting job may go unseen before it is forgotten."""
        return 3 * self.recheck_max_seconds + self.starvation_seconds

    # ------------------------------------------------------------ probes

    async def open(self) -> None:
        """Start the probes in a thread (NVML's first call is slow)."""
        await asyncio.to_thread(self._call_probes, "open")

    async def close(self) -> None:
        """Close the probes in a thread."""
        await asyncio.to_thread(self._call_probes, "close")

    def _call_probes(self, method: str) -> None:
        for probe in self.probes:
            func = getattr(probe, method, None)
            if func is None:
                continue
            try:
                func()
            except Exception:
                logger.warning(
                    "probe %r failed to %s; its readings may be missing",
                    probe,
                    method,
                    exc_info=True,
                    extra={"event": "resources.probe_failed"},
                )

    def read_host(self) -> HostReading | None:
        """Return the first host reading a probe gives, or None."""
        for probe in self.probes:
            reading = self._read(probe, "read_host")
            if reading is not None:
                return reading  # type: ignore[no-any-return]
        return None

    def read_gpus(self) -> list[GpuReading]:
        """Return the GPUs of the first probe that reads GPUs, by index."""
        for probe in self.probes:
            readings = self._read(probe, "read_gpus")
            if readings is not None:
                return sorted(readings, key=lambda g: g.index)
        return []

    def _read(self, probe: ResourceProbe, method: str) -> Any:
        try:
            reading = getattr(probe, method)()
        except Exception:
            # A probe that raises counts as one that does not read this; say so
            # once per probe, not at every admission.
            if id(probe) not in self._failed_probes:
                self._failed_probes.add(id(probe))
                logger.warning(
                    "probe %r raised in %s; its readings are ignored",
                    probe,
                    method,
                    exc_info=True,
                    extra={"event": "resources.probe_failed"},
                )
            return None
        return reading

    # ------------------------------------------------------------ figures

    @property
    def running_jobs(self) -> int:
        """How many jobs hold a reservation."""
        return len(self._reservations)

    @property
    def waiting_jobs(self) -> int:
        """How many refused jobs this manager remembers as waiting."""
        return len(self._waiting)

    def reservation(self, job_id: str) -> Reservation | None:
        """Return the newest live reservation of ``job_id``, or None."""
        for reservation in reversed(self._reservations.values()):
            if reservation.job_id == job_id:
                return reservation
        return None

    def reserved_memory_mb(self) -> int:
        """Host memory reserved by running jobs."""
        return sum(r.memory_mb for r in self._reservations.values())

    def reserved_gpu_memory_mb(self, index: int | None = None) -> int:
        """GPU memory reserved on device ``index``, or on all devices together."""
        if index is None:
            return sum(
                r.gpu_memory_mb * len(r.gpus) for r in self._reservations.values()
            )
        return sum(
            r.gpu_memory_mb for r in self._reservations.values() if index in r.gpus
        )

    # ------------------------------------------------------------ submit check

    def check_submittable(
        self, request: ResourceRequest | None, *, only_here: bool = False
    ) -> None:
        """Raise ResourceRequestError if ``request`` could never be admitted here.

        Only what does not change counts: the limits, the host's total memory and
        each device's total memory. With no GPU visible a GPU request is accepted,
        since a worker on another host may have GPUs, unless ``only_here`` says
        that no other process takes jobs from this queue (a memory queue).

        Raises:
            ResourceRequestError: The message names the limit or device in the way.
        """
        if request is None or request.is_empty():
            return
        limits = self.limits
        memory = request.memory_mb or 0
        if limits.max_memory_mb is not None and memory > limits.max_memory_mb:
            raise ResourceRequestError(
                f"resources.memory_mb={memory} exceeds the limit "
                f"max_memory_mb={limits.max_memory_mb}; ask for at most that"
            )
        host = self.read_host() if memory else None
        if host is not None and memory > host.memory_total_mb:
            raise ResourceRequestError(
                f"resources.memory_mb={memory} exceeds this host's memory "
                f"({host.memory_total_mb:.0f} MB); ask for less"
            )
        per_gpu = request.gpu_memory_mb or 0
        if limits.max_gpu_memory_mb is not None and per_gpu > limits.max_gpu_memory_mb:
            raise ResourceRequestError(
                f"resources.gpu_memory_mb={per_gpu} exceeds the limit "
                f"max_gpu_memory_mb={limits.max_gpu_memory_mb} (per device); "
                "ask for at most that"
            )
        wanted = request.gpus or 0
        gpus = self.read_gpus() if wanted else []
        if not gpus:
            if wanted and only_here:
                raise ResourceRequestError(
                    f"resources asks for {wanted} GPU(s), but this worker sees no "
                    "GPU and its queue is in this process's memory, so no other "
                    "worker can take the job: it would wait forever; leave out "
                    "resources.gpus and resources.gpu_memory_mb, or run workers "
                    "that have GPUs on a shared queue (Redis)"
                )
            return
        fitting = [g for g in gpus if g.memory_total_mb >= per_gpu]
        if len(fitting) < wanted:
            biggest = max(g.memory_total_mb for g in gpus)
            raise ResourceRequestError(
                f"resources asks for {wanted} GPU(s) with gpu_memory_mb={per_gpu} "
                f"each; {len(fitting)} of this worker's {len(gpus)} GPU(s) could "
                f"hold that (the largest has {biggest:.0f} MB)"
            )

    # ------------------------------------------------------------ admission

    def try_reserve(
        self, job_id: str, request: ResourceRequest | None, *, priority: int = 50
    ) -> Reservation | None:
        """Reserve what the job asks for, or remember it as waiting and return None.

        Args:
            job_id: The job.
            request: What it asks for (None: only a job slot).
            priority: The job's priority, to wake waiting jobs in queue order.

        Returns:
            The reservation (``gpus`` names the devices), or None when the job
            does not fit now; ``wait_info(job_id)`` then says why.
        """
        now = self.clock.monotonic()
        self._prune(now)
        request = request or ResourceRequest()
        waiter = self._waiting.get(job_id)
        since = waiter.since if waiter is not None else now
        holds = [
            w
            for w in self._waiting.values()
            if w.job_id != job_id and self._starving(w, now) and w.since < since
        ]
        host = self._host_for(request, holds)
        gpus = self.read_gpus() if request.gpus or holds else []
        ledger = self._ledger()
        for held in sorted(holds, key=lambda w: w.since):
            self._hold(held.request, ledger, gpus)
        picked, reason = self._place(request, ledger, host, gpus)
        if picked is None:
            if (
                holds
                and self._place(request, self._ledger(), host, gpus)[0] is not None
            ):
                oldest = min(holds, key=lambda w: w.since)
                reason = (
                    f"held back for job {oldest.job_id}, which has waited "
                    f"{now - oldest.since:.0f} s for what this job would take"
                )
            self._refuse(job_id, request, priority, now, reason)
            return None
        self._waiting.pop(job_id, None)
        reservation = Reservation(
            job_id=job_id,
            memory_mb=request.memory_mb or 0,
            gpu_memory_mb=request.gpu_memory_mb or 0,
            gpus=picked,
        )
        self._reservations[id(reservation)] = reservation
        logger.debug(
            "job %s reserved %r",
            job_id,
            reservation,
            extra={"job_id": job_id, "event": "resources.reserved"},
        )
        return reservation

    def release(self, reservation: Reservation | None) -> None:
        """Give back a reservation; a second release does nothing."""
        if reservation is None or reservation.released:
            return
        reservation.released = True
        self._reservations.pop(id(reservation), None)
        logger.debug(
            "job %s released %r",
            reservation.job_id,
            reservation,
            extra={"job_id": reservation.job_id, "event": "resources.released"},
        )
        self._changed.set()

    def forget(self, job_id: str) -> None:
        """Stop remembering ``job_id`` as waiting (it was canceled or ran elsewhere)."""
        if self._waiting.pop(job_id, None) is not None:
            self._changed.set()

    def wait_info(self, job_id: str) -> WaitInfo | None:
        """Return why ``job_id`` waits, or None if it is not waiting."""
        waiter = self._waiting.get(job_id)
        if waiter is None:
            return None
        now = self.clock.monotonic()
        return WaitInfo(
            job_id=job_id,
            reason=waiter.reason,
            refusals=waiter.refusals,
            waited_seconds=now - waiter.since,
            starving=self._starving(waiter, now),
        )

    def recheck_delay(self, job_id: str) -> float:
        """Return when a refused job should be looked at again: doubling, capped."""
        waiter = self._waiting.get(job_id)
        refusals = waiter.refusals if waiter is not None else 1
        delay = self.recheck_seconds * 2 ** min(max(refusals - 1, 0), 16)
        return float(min(delay, self.recheck_max_seconds))

    def wakeable(self) -> list[tuple[str, int]]:
        """Return (job id, priority) of waiting jobs that fit now, once each.

        Jobs are taken in admission order (holding jobs first, then by priority
        and waiting time); each one that fits is counted as reserved before the
        next is looked at, so a release wakes as many jobs as it can hold. A job
        is named again only after it was refused again.
        """
        now = self.clock.monotonic()
        self._prune(now)
        if not self._waiting:
            return []
        waiters = sorted(
            self._waiting.values(),
            key=lambda w: (
                not self._starving(w, now),
                0 if self._starving(w, now) else -w.priority,
                w.since,
            ),
        )
        host = self.read_host()
        gpus = self.read_gpus()
        ledger = self._ledger()
        woken: list[tuple[str, int]] = []
        for waiter in waiters:
            picked, _ = self._place(waiter.request, ledger, host, gpus)
            if picked is not None:
                self._take(waiter.request, picked, ledger)
                if not waiter.woken:
                    waiter.woken = True
                    woken.append((waiter.job_id, waiter.priority))
            elif self._starving(waiter, now):
                self._hold(waiter.request, ledger, gpus)
        return woken

    async def wait_changed(self, seconds: float | None = None) -> None:
        """Wait until a reservation is released (or a waiter forgotten).

        Waits at most ``seconds`` on the manager's clock (None: no bound), so
        changes the probes see without a release are noticed too.
        """
        if self._changed.is_set():
            self._changed.clear()
            return
        waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(self._changed.wait())}
        if seconds is not None:
            waits.add(asyncio.ensure_future(self.clock.sleep(seconds)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in waits:
                future.cancel()
        self._changed.clear()

    # ------------------------------------------------------------ planning

    def _starving(self, waiter: _Waiter, now: float) -> bool:
        return now - waiter.since >= self.starvation_seconds

    def _prune(self, now: float) -> None:
        stale = [
            w.job_id
            for w in self._waiting.values()
            if now - w.last_seen > self.stale_seconds
        ]
        for job_id in stale:
            del self._waiting[job_id]

    def _host_for(
        self, request: ResourceRequest, holds: list[_Waiter]
    ) -> HostReading | None:
        needs_host = bool(request.memory_mb) or any(h.request.memory_mb for h in holds)
        if needs_host or self.limits.max_cpu_percent is not None:
            return self.read_host()
        return None

    def _refuse(
        self,
        job_id: str,
        request: ResourceRequest,
        priority: int,
        now: float,
        reason: str,
    ) -> None:
        waiter = self._waiting.get(job_id)
        if waiter is None:
            waiter = _Waiter(job_id, request, priority, since=now, last_seen=now)
            self._waiting[job_id] = waiter
        waiter.request = request
        waiter.priority = priority
        waiter.last_seen = now
        waiter.refusals += 1
        waiter.woken = False
        waiter.reason = reason

    def _ledger(self) -> _Ledger:
        gpu: dict[int, int] = {}
        for r in self._reservations.values():
            for index in r.gpus:
                gpu[index] = gpu.get(index, 0) + r.gpu_memory_mb
        return _Ledger(
            jobs=len(self._reservations),
            memory_mb=self.reserved_memory_mb(),
            gpu=gpu,
        )

    def _take(self, request: ResourceRequest, gpus: list[int], ledger: _Ledger) -> None:
        ledger.jobs += 1
        ledger.memory_mb += request.memory_mb or 0
        for index in gpus:
            ledger.gpu[index] = ledger.gpu.get(index, 0) + (request.gpu_memory_mb or 0)

    def _hold(
        self, request: ResourceRequest, ledger: _Ledger, gpus: list[GpuReading]
    ) -> None:
        """Count a waiting job's request as taken, on the devices it would get."""
        count = request.gpus or 0
        ranked = sorted(gpus, key=lambda g: (-self._gpu_free(g, ledger), g.index))
        self._take(request, [g.index for g in ranked[:count]], ledger)

    def _gpu_free(self, gpu: GpuReading, ledger: _Ledger) -> float:
        reserved = ledger.gpu.get(gpu.index, 0)
        free = gpu.memory_total_mb - max(gpu.memory_used_mb, reserved)
        if self.limits.max_gpu_memory_mb is not None:
            free = min(free, self.limits.max_gpu_memory_mb - reserved)
        return free

    def _place(
        self,
        request: ResourceRequest,
        ledger: _Ledger,
        host: HostReading | None,
        gpus: list[GpuReading],
    ) -> tuple[list[int] | None, str]:
        """Return the devices the request would get, or None and why it waits."""
        limits = self.limits
        if (
            limits.max_concurrent_jobs is not None
            and ledger.jobs >= limits.max_concurrent_jobs
        ):
            return None, (
                f"max_concurrent_jobs={limits.max_concurrent_jobs} reached "
                f"({ledger.jobs} running or held)"
            )
        memory = request.memory_mb or 0
        if memory and limits.max_memory_mb is not None:
            if ledger.memory_mb + memory > limits.max_memory_mb:
                return None, (
                    f"max_memory_mb={limits.max_memory_mb}: {ledger.memory_mb} MB "
                    f"reserved, {memory} MB asked"
                )
        if memory and host is not None:
            free = host.memory_total_mb - max(host.memory_used_mb, ledger.memory_mb)
            if free < memory:
                return None, f"host memory: {free:.0f} MB free, {memory} MB asked"
        if (
            limits.max_cpu_percent is not None
            and host is not None
            and host.cpu_percent > limits.max_cpu_percent
        ):
            return None, (
                f"host CPU at {host.cpu_percent:.0f}%, above "
                f"max_cpu_percent={limits.max_cpu_percent:g}"
            )
        count = request.gpus or 0
        if not count:
            return [], ""
        per_gpu = request.gpu_memory_mb or 0
        if not gpus:
            return None, f"{count} GPU(s) asked, but this worker sees no GPU"
        room = [(self._gpu_free(g, ledger), g.index) for g in gpus]
        fitting = sorted((-f, i) for f, i in room if f >= per_gpu)
        if len(fitting) < count:
            most = max((f for f, _ in room), default=0.0)
            return None, (
                f"GPU memory: {count} device(s) with {per_gpu} MB free needed, "
                f"{len(fitting)} available (most free: {most:.0f} MB)"
            )
        return sorted(index for _, index in fitting[:count]), ""

    # ------------------------------------------------------------ report

    def snapshot(self) -> dict[str, Any]:
        """Return the ``_resources`` report: limits, usage, reserved, jobs, GPUs."""
        host = self.read_host()
        gpus = self.read_gpus()
        return {
            "limits": self.limits.model_dump(),
            "usage": {
                "memory_used_mb": round(host.memory_used_mb) if host else None,
                "memory_total_mb": round(host.memory_total_mb) if host else None,
                "cpu_percent": round(host.cpu_percent, 1) if host else None,
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
                    "memory_total_mb": round(g.memory_total_mb),
                    "memory_used_mb": round(g.memory_used_mb),
                    "memory_reserved_mb": self.reserved_gpu_memory_mb(g.index),
                }
                for g in gpus
            ],
        }
