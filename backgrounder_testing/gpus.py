"""SimulatedGPUs: GPUs with set memory, as a resource-probe plugin for tests."""

from __future__ import annotations

from collections.abc import Sequence

from backgrounder.hookspecs import hookimpl
from backgrounder.resources.probes import GpuReading, HostReading, ResourceProbe

__all__ = ["SimulatedGPUs"]


class SimulatedGPUs:
    """GPUs that exist only in memory: pass them as a plugin to a JobManager.

    ``JobManager(plugins=[SimulatedGPUs([10000, 10000])])`` gives the manager two
    devices of 10,000 MB (indexes 0 and 1) in place of any real GPU, so jobs that
    ask for ``gpu_memory_mb`` are admitted, refused and assigned devices as on a
    GPU host. ``set_used(index, mb)`` sets the memory another program uses on a
    device, as NVML would report it. Reads no host figures.

    Added in 0.1.
    """

    def __init__(
        self, memory_mb: Sequence[int], names: Sequence[str] | None = None
    ) -> None:
        """Simulate one GPU per entry of ``memory_mb`` (its total memory in MB).

        Args:
            memory_mb: Total memory of each device, MB; device i is index i.
            names: Device names; default ``"Simulated GPU i"``.

        Raises:
            ValueError: A size is not positive, or names and sizes differ in count.
        """
        sizes = list(memory_mb)
        for size in sizes:
            if isinstance(size, bool) or not isinstance(size, int | float) or size <= 0:
                raise ValueError(f"GPU memory must be a positive number (got {size!r})")
        if names is not None and len(names) != len(sizes):
            raise ValueError(
                f"names has {len(names)} entries for {len(sizes)} GPU(s); give one "
                "name per GPU or none"
            )
        self.memory_mb = sizes
        self.names = (
            list(names)
            if names is not None
            else [f"Simulated GPU {i}" for i in range(len(sizes))]
        )
        self.used_mb = [0.0] * len(sizes)
        self.reads = 0

    def __repr__(self) -> str:
        return f"SimulatedGPUs({self.memory_mb!r})"

    @hookimpl
    def backgrounder_resource_probes(self) -> list[ResourceProbe]:
        """Offer these GPUs as the manager's GPU probe."""
        return [self]

    def set_used(self, index: int, mb: float) -> None:
        """Set the memory in use on device ``index`` (as another program would).

        Raises:
            IndexError: No such device.
            ValueError: ``mb`` is negative or above the device's total.
        """
        if not 0 <= index < len(self.memory_mb):
            raise IndexError(
                f"no simulated GPU {index!r}; indexes are 0-{len(self.memory_mb) - 1}"
            )
        if not 0 <= mb <= self.memory_mb[index]:
            raise ValueError(
                f"used memory on GPU {index} must be between 0 and "
                f"{self.memory_mb[index]} MB (got {mb!r})"
            )
        self.used_mb[index] = float(mb)

    def read_host(self) -> HostReading | None:
        """Return None: the host is read by other probes."""
        return None

    def read_gpus(self) -> list[GpuReading]:
        """Return a reading of every simulated device."""
        self.reads += 1
        return [
            GpuReading(
                index=i,
                name=self.names[i],
                memory_total_mb=float(total),
                memory_used_mb=self.used_mb[i],
            )
            for i, total in enumerate(self.memory_mb)
        ]
