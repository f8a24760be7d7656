"""The NVML GPU probe, against a fake NVML module (no GPU is needed)."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from backgrounder import JobManager, TaskRegistry
from backgrounder.resources.nvml import NvmlProbe
from tests.conftest import wait_for

MB = 1024 * 1024


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


class FakeLibraryNotFound(FakeNVMLError):
    """Stands in for pynvml.NVMLError_LibraryNotFound."""


def fake_nvml(
    devices: list[tuple[str, int, int]], *, init_error: Exception | None = None
) -> types.ModuleType:
    """Return a module shaped like pynvml with ``devices`` (name, total, used MB)."""
    module = types.ModuleType("pynvml")
    module.calls: list[str] = []  # type: ignore[misc]

    def init() -> None:
        module.calls.append("init")
        if init_error is not None:
            raise init_error

    def handle(index: int) -> int:
        if not 0 <= index < len(devices):
            raise FakeNVMLError("Invalid Argument")
        return index

    def memory(index: int) -> SimpleNamespace:
        _, total, used = devices[index]
        if total < 0:
            raise FakeNVMLError("GPU is lost")
        return SimpleNamespace(
            total=total * MB, used=used * MB, free=(total - used) * MB
        )

    module.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    module.NVMLError_LibraryNotFound = FakeLibraryNotFound  # type: ignore[attr-defined]
    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: module.calls.append("shutdown")  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda i: devices[i][0].encode()  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    return module


def no_gpu_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", "") == "resources.no_gpus"]


def test_nvml_probe_reads_every_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Index, name (bytes decoded), total and used memory in MB, per device."""
    module = fake_nvml([("A100", 40960, 1024), ("T4", 15360, 0)])
    monkeypatch.setitem(sys.modules, "pynvml", module)
    probe = NvmlProbe()
    readings = probe.read_gpus()
    assert readings is not None
    assert [
        (g.index, g.name, g.memory_total_mb, g.memory_used_mb) for g in readings
    ] == [
        (0, "A100", 40960, 1024),
        (1, "T4", 15360, 0),
    ]
    assert probe.read_host() is None
    probe.read_gpus()
    probe.close()
    assert module.calls == ["init", "shutdown"]  # type: ignore[attr-defined]
    assert probe.read_gpus() is None  # closed
    probe.open()  # a manager started again opens its probes again
    assert probe.read_gpus() is not None
    assert module.calls == ["init", "shutdown", "init"]  # type: ignore[attr-defined]


def test_nvml_probe_library_missing_means_no_gpus_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without pynvml the probe reports no GPUs and says so once, at INFO."""
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    caplog.set_level(logging.INFO, logger="backgrounder.resources.nvml")
    probe = NvmlProbe()
    assert probe.read_gpus() is None
    assert probe.read_gpus() is None
    records = no_gpu_records(caplog)
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    assert "backgrounder[gpu]" in records[0].getMessage()
    probe.close()


def test_nvml_probe_driver_error_means_no_gpus_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An NVMLError from nvmlInit (driver not loaded) means no GPUs, one WARNING."""
    module = fake_nvml([], init_error=FakeNVMLError("Driver Not Loaded"))
    monkeypatch.setitem(sys.modules, "pynvml", module)
    caplog.set_level(logging.INFO, logger="backgrounder.resources.nvml")
    probe = NvmlProbe()
    probe.open()
    assert probe.read_gpus() is None
    assert probe.read_gpus() is None
    records = no_gpu_records(caplog)
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert "Driver Not Loaded" in records[0].getMessage()
    assert module.calls == ["init"]  # type: ignore[attr-defined]
    probe.close()
    assert module.calls == ["init"]  # never started, so never shut down


def test_nvml_probe_without_driver_library_logs_info(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The usual case on a CPU host: the binding is there, the driver is not."""
    module = fake_nvml(
        [], init_error=FakeLibraryNotFound("NVML Shared Library Not Found")
    )
    monkeypatch.setitem(sys.modules, "pynvml", module)
    caplog.set_level(logging.INFO, logger="backgrounder.resources.nvml")
    assert NvmlProbe().read_gpus() is None
    (record,) = no_gpu_records(caplog)
    assert record.levelno == logging.INFO


def test_nvml_probe_skips_a_device_that_cannot_be_read(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A device that errors is left out (warned once); the others are read."""
    monkeypatch.setitem(
        sys.modules, "pynvml", fake_nvml([("lost", -1, 0), ("ok", 8000, 10)])
    )
    probe = NvmlProbe()
    for _ in range(3):
        readings = probe.read_gpus()
        assert readings is not None and [g.index for g in readings] == [1]
    warned = [
        r
        for r in caplog.records
        if getattr(r, "event", "") == "resources.gpu_unreadable"
    ]
    assert len(warned) == 1


async def test_manager_reports_and_assigns_nvml_gpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Through the built-in plugin, _resources lists NVML's GPUs and jobs get them."""
    monkeypatch.setitem(
        sys.modules, "pynvml", fake_nvml([("A", 10000, 9000), ("B", 10000, 0)])
    )
    registry = TaskRegistry()

    class Runner:
        async def execute(self, job: Any, ctx: Any) -> dict[str, Any]:
            return {"gpus": ctx.gpus}

    registry.add("gpu", Runner())
    async with JobManager(db_path=tmp_path / "jobs.db", registry=registry) as manager:
        snap = manager.resources.snapshot()
        assert [(g["index"], g["name"], g["memory_used_mb"]) for g in snap["gpus"]] == [
            (0, "A", 9000),
            (1, "B", 0),
        ]
        job = await manager.submit("gpu", resources={"gpu_memory_mb": 4000})
        done = await wait_for(manager, job.id, "done")
        assert done.assets.custom == {"gpus": [1]}  # device 0 has 1,000 MB free
