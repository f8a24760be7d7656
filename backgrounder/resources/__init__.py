"""Resource limits, reservations and probes (host memory, CPU, GPUs)."""

from __future__ import annotations

from collections.abc import Iterable

from backgrounder.resources.limits import ResourceLimits
from backgrounder.resources.manager import Reservation, ResourceManager, WaitInfo
from backgrounder.resources.probes import (
    GpuReading,
    HostReading,
    PsutilProbe,
    ResourceProbe,
)

__all__ = [
    "GpuReading",
    "HostReading",
    "PsutilProbe",
    "Reservation",
    "ResourceLimits",
    "ResourceManager",
    "ResourceProbe",
    "WaitInfo",
    "cuda_env",
]


def cuda_env(gpus: Iterable[int]) -> dict[str, str]:
    """Return the environment a child process needs to see only ``gpus``.

    ``CUDA_VISIBLE_DEVICES`` lists the device indexes (an empty list hides every
    GPU), and ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` makes CUDA number devices as NVML
    does, so index 1 here is index 1 in ``_resources``. Merge it into the child's
    environment: ``env = {**os.environ, **cuda_env(ctx.gpus)}``. Inside the
    child, the devices are renumbered from 0.

    Args:
        gpus: Device indexes, such as ``ctx.gpus``.

    Returns:
        The variables to set.

    Raises:
        ValueError: An index is not a non-negative integer.

    Added in 0.1.
    """
    indexes = list(gpus)
    for index in indexes:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(
                f"GPU indexes must be non-negative integers (got {index!r})"
            )
    return {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in indexes),
    }
