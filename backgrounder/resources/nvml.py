"""NVIDIA GPUs through NVML (``pynvml``, the ``gpu`` extra); a built-in probe plugin.

Without the library, or without a working driver, the probe reports no GPUs: it
logs why once and never raises.
"""

from __future__ import annotations

import importlib
import logging
import threading
import warnings
from types import ModuleType
from typing import Any

from backgrounder.hookspecs import hookimpl
from backgrounder.resources.probes import GpuReading, HostReading, ResourceProbe

__all__ = ["NvmlProbe"]

logger = logging.getLogger(__name__)

_MB = 1024 * 1024


class NvmlProbe:
    """Reads every NVIDIA GPU NVML sees: index, name, total and used memory.

    NVML starts on the first read (or ``open()``, which the ResourceManager runs
    in a thread at start-up, so the slow first call stays off the event loop).
    Device indexes are NVML's, in PCI bus order; ``cuda_env`` sets
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so CUDA counts the same way.

    Added in 0.1.
    """

    def __init__(self, module_name: str = "pynvml") -> None:
        """Build a probe; ``module_name`` is the NVML binding to import."""
        self.module_name = module_name
        self._nvml: Any = None
        self._state = "new"  # new | ready | unavailable | closed
        self._lock = threading.Lock()
        self._failed_devices: set[int] = set()

    def __repr__(self) -> str:
        return f"NvmlProbe({self._state})"

    @property
    def available(self) -> bool:
        """True once NVML started and answers."""
        return self._state == "ready"

    def open(self) -> None:
        """Start NVML now (idempotent); a failure means no GPUs, logged once."""
        with self._lock:
            if self._state in ("new", "closed"):
                self._start()

    def close(self) -> None:
        """Shut NVML down if this probe started it."""
        with self._lock:
            if self._state == "ready":
                try:
                    self._nvml.nvmlShutdown()
                except Exception as exc:
                    logger.debug("nvmlShutdown failed: %s", exc)
            self._state = "closed"

    def read_host(self) -> HostReading | None:
        """Return None: this probe reads GPUs only."""
        return None

    def read_gpus(self) -> list[GpuReading] | None:
        """Return one reading per GPU, or None when NVML is not usable."""
        if self._state == "new":
            self.open()
        if self._state != "ready":
            return None
        nvml = self._nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            logger.warning("NVML cannot count GPUs: %s; reporting none", exc)
            return []
        readings = []
        for index in range(count):
            reading = self._read_device(index)
            if reading is not None:
                readings.append(reading)
        return readings

    def _start(self) -> None:
        module = self._import()
        if module is None:
            self._state = "unavailable"
            return
        try:
            module.nvmlInit()
        except Exception as exc:
            self._state = "unavailable"
            not_found = getattr(module, "NVMLError_LibraryNotFound", ())
            if isinstance(exc, not_found):
                logger.info(
                    "no NVIDIA driver library on this host (%s); no GPUs reported",
                    exc,
                    extra={"event": "resources.no_gpus"},
                )
            else:
                logger.warning(
                    "NVML failed to start (%s: %s); no GPUs reported. Check the "
                    "NVIDIA driver with nvidia-smi",
                    type(exc).__name__,
                    exc,
                    extra={"event": "resources.no_gpus"},
                )
            return
        self._nvml = module
        self._state = "ready"
        logger.info(
            "NVML started: %d GPU(s) visible",
            _count(module),
            extra={"event": "resources.gpus_found"},
        )

    def _import(self) -> ModuleType | None:
        try:
            with warnings.catch_warnings():
                # A deprecated wrapper package of the same name warns on import;
                # the binding it loads is the one the gpu extra installs.
                warnings.simplefilter("ignore", FutureWarning)
                return importlib.import_module(self.module_name)
        except ImportError:
            logger.info(
                "%s is not installed; no GPUs reported. Install backgrounder[gpu] "
                "to use NVIDIA GPUs",
                self.module_name,
                extra={"event": "resources.no_gpus"},
            )
            return None

    def _read_device(self, index: int) -> GpuReading | None:
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        except nvml.NVMLError as exc:
            if index not in self._failed_devices:
                self._failed_devices.add(index)
                logger.warning(
                    "GPU %d cannot be read (%s); it is left out until it answers",
                    index,
                    exc,
                    extra={"event": "resources.gpu_unreadable", "gpu": index},
                )
            return None
        self._failed_devices.discard(index)
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return GpuReading(
            index=index,
            name=str(name),
            memory_total_mb=memory.total / _MB,
            memory_used_mb=memory.used / _MB,
        )


def _count(module: Any) -> int:
    try:
        return int(module.nvmlDeviceGetCount())
    except Exception:
        return 0


@hookimpl
def backgrounder_resource_probes() -> list[ResourceProbe]:
    """Offer the NVML GPU probe (it reports no GPUs where NVML is not usable)."""
    return [NvmlProbe()]
