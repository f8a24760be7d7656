"""ResourceLimits, ResourceManager admission rules, probes, cuda_env, SimulatedGPUs."""

from __future__ import annotations

import asyncio
from collections import namedtuple
from typing import Any

import pytest

from backgrounder.errors import ConfigurationError, ResourceRequestError
from backgrounder.models import ResourceRequest
from backgrounder.resources import (
    HostReading,
    PsutilProbe,
    ResourceLimits,
    ResourceManager,
    cuda_env,
)
from backgrounder.resources import probes as probes_module
from backgrounder_testing import FakeClock, SimulatedGPUs


class FakeHost:
    """A host probe whose memory and CPU the test sets."""

    def __init__(self, total: float = 16000, used: float = 2000, cpu: float = 10.0):
        self.total, self.used, self.cpu = total, used, cpu

    def read_host(self) -> HostReading:
        return HostReading(self.total, self.used, self.total - self.used, self.cpu)

    def read_gpus(self) -> None:
        return None


def req(**fields: Any) -> ResourceRequest:
    return ResourceRequest(**fields)


def make(
    limits: ResourceLimits | None = None, *probes: Any, clock: FakeClock | None = None
) -> ResourceManager:
    return ResourceManager(limits, list(probes), clock=clock or FakeClock())


# ---------------------------------------------------------------- limits


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_concurrent_jobs", 0),
        ("max_memory_mb", -5),
        ("max_gpu_memory_mb", True),
        ("max_memory_mb", "lots"),
        ("max_cpu_percent", 0),
        ("max_cpu_percent", 150),
    ],
    ids=["jobs-zero", "memory-negative", "gpu-bool", "memory-str", "cpu-0", "cpu-150"],
)
def test_limits_reject_bad_value_naming_the_field(field: str, value: Any) -> None:
    """A limit that is not a positive number fails with the field and value named."""
    with pytest.raises(ConfigurationError, match=rf"{field}.*\(got {value!r}\)"):
        ResourceLimits(**{field: value})


def test_limits_accept_positive_values_and_none() -> None:
    """Positive values and None are kept as given; an unknown field is refused."""
    limits = ResourceLimits(max_concurrent_jobs=2, max_cpu_percent=75)
    assert limits.max_concurrent_jobs == 2
    assert limits.max_cpu_percent == 75.0
    assert limits.max_memory_mb is None
    with pytest.raises(ConfigurationError, match="max_gpus"):
        ResourceLimits(max_gpus=1)  # type: ignore[call-arg]


# ---------------------------------------------------------------- submit check


def test_check_submittable_names_the_limit_in_the_way() -> None:
    """A request above a limit, the host or every device is refused at once."""
    gpus = SimulatedGPUs([10000, 10000])
    manager = make(
        ResourceLimits(max_memory_mb=8000, max_gpu_memory_mb=9000),
        FakeHost(total=16000),
        gpus,
    )
    with pytest.raises(ResourceRequestError, match="max_memory_mb=8000"):
        manager.check_submittable(req(memory_mb=9000))
    with pytest.raises(ResourceRequestError, match="max_gpu_memory_mb=9000"):
        manager.check_submittable(req(gpu_memory_mb=9500))
    manager.check_submittable(req(memory_mb=8000, gpu_memory_mb=9000, gpus=2))

    unlimited = make(None, FakeHost(total=16000), gpus)
    with pytest.raises(ResourceRequestError, match="host's memory"):
        unlimited.check_submittable(req(memory_mb=20000))
    with pytest.raises(ResourceRequestError, match="largest has 10000 MB"):
        unlimited.check_submittable(req(gpu_memory_mb=12000))
    with pytest.raises(ResourceRequestError, match="3 GPU"):
        unlimited.check_submittable(req(gpu_memory_mb=1000, gpus=3))


def test_check_submittable_accepts_gpu_request_where_no_gpu_is_seen() -> None:
    """An API process without GPUs accepts GPU jobs for workers that have them."""
    make(None, FakeHost()).check_submittable(req(gpu_memory_mb=50000))


def test_check_submittable_refuses_gpu_request_no_worker_could_take() -> None:
    """With no GPU seen and no other process on the queue, a GPU job never runs."""
    with pytest.raises(ResourceRequestError, match=r"sees no GPU.*gpu_memory_mb"):
        make(None, FakeHost()).check_submittable(req(gpu_memory_mb=500), only_here=True)
    make(None, FakeHost()).check_submittable(req(memory_mb=10), only_here=True)


# ---------------------------------------------------------------- admission


def test_gpu_jobs_get_the_freest_device_and_never_share_beyond_memory() -> None:
    """Two 6,000 MB jobs on two 10,000 MB GPUs get different devices; a third waits."""
    manager = make(None, SimulatedGPUs([10000, 10000]))
    first = manager.try_reserve("a", req(gpu_memory_mb=6000))
    second = manager.try_reserve("b", req(gpu_memory_mb=6000))
    assert first is not None and second is not None
    assert {first.gpus[0], second.gpus[0]} == {0, 1}
    assert manager.try_reserve("c", req(gpu_memory_mb=6000)) is None
    info = manager.wait_info("c")
    assert info is not None and "GPU memory" in info.reason

    manager.release(second)
    manager.release(second)  # a second release changes nothing
    third = manager.try_reserve("c", req(gpu_memory_mb=6000))
    assert third is not None and third.gpus == second.gpus
    assert manager.wait_info("c") is None
    assert manager.reserved_gpu_memory_mb() == 12000


def test_gpu_used_by_another_program_counts_as_taken() -> None:
    """Free memory is total minus the larger of used and reserved."""
    gpus = SimulatedGPUs([10000, 10000])
    manager = make(None, gpus)
    gpus.set_used(0, 5000)
    only = manager.try_reserve("a", req(gpu_memory_mb=6000))
    assert only is not None and only.gpus == [1]
    assert manager.try_reserve("b", req(gpu_memory_mb=6000)) is None
    gpus.set_used(0, 0)
    assert manager.try_reserve("b", req(gpu_memory_mb=6000)) is not None


def test_multi_gpu_request_gets_distinct_devices() -> None:
    """A job asking for two devices gets two, with memory reserved on each."""
    manager = make(ResourceLimits(max_gpu_memory_mb=8000), SimulatedGPUs([1e4] * 3))
    both = manager.try_reserve("a", req(gpu_memory_mb=5000, gpus=2))
    assert both is not None and len(set(both.gpus)) == 2
    assert manager.reserved_gpu_memory_mb() == 10000
    # The per-device limit (8,000) leaves 3,000 on each used device.
    assert manager.try_reserve("b", req(gpu_memory_mb=4000, gpus=2)) is None
    assert manager.try_reserve("c", req(gpu_memory_mb=3000, gpus=3)) is not None


def test_max_concurrent_jobs_counts_every_job() -> None:
    """Jobs without requests still take one of max_concurrent_jobs."""
    manager = make(ResourceLimits(max_concurrent_jobs=2))
    held = [manager.try_reserve(j, None) for j in "ab"]
    assert all(held)
    assert manager.try_reserve("c", None) is None
    info = manager.wait_info("c")
    assert info is not None and "max_concurrent_jobs=2" in info.reason
    manager.release(held[0])
    assert manager.try_reserve("c", None) is not None
    assert manager.running_jobs == 2


def test_memory_limit_and_host_free_memory_gate_starts() -> None:
    """memory_mb must fit max_memory_mb and what the host probe reports free."""
    host = FakeHost(total=16000, used=13000)
    manager = make(ResourceLimits(max_memory_mb=8000), host)
    assert manager.try_reserve("a", req(memory_mb=5000)) is None
    info = manager.wait_info("a")
    assert info is not None and "host memory" in info.reason
    host.used = 2000
    assert manager.try_reserve("a", req(memory_mb=5000)) is not None
    assert manager.try_reserve("b", req(memory_mb=5000)) is None
    info = manager.wait_info("b")
    assert info is not None and "max_memory_mb=8000" in info.reason
    assert manager.try_reserve("c", req(memory_mb=3000)) is not None


def test_cpu_limit_gates_every_start() -> None:
    """No job starts while the host CPU is above max_cpu_percent."""
    host = FakeHost(cpu=95.0)
    manager = make(ResourceLimits(max_cpu_percent=80), host)
    assert manager.try_reserve("a", None) is None
    info = manager.wait_info("a")
    assert info is not None and "max_cpu_percent=80" in info.reason
    host.cpu = 50.0
    assert manager.try_reserve("a", None) is not None


def test_smaller_jobs_pass_a_waiting_big_job_until_it_starves() -> None:
    """A big job does not block small ones, but after starvation_seconds it holds.

    From then on newcomers that would take what it waits for are refused, and
    it starts as soon as the running jobs in its way end.
    """
    clock = FakeClock()
    manager = make(ResourceLimits(max_memory_mb=10000), clock=clock)
    a = manager.try_reserve("a", req(memory_mb=4000))
    b = manager.try_reserve("b", req(memory_mb=4000))
    assert manager.try_reserve("big", req(memory_mb=8000)) is None
    small = manager.try_reserve("s1", req(memory_mb=2000))
    assert small is not None  # a small job passes the waiting big one

    clock.advance(manager.starvation_seconds)
    info = manager.wait_info("big")
    assert info is not None and info.starving
    manager.release(a)
    # 6,000 MB reserved and the big job holds 8,000: a newcomer of 3,000 waits,
    # though it would fit the 4,000 MB left without the hold.
    assert manager.try_reserve("s2", req(memory_mb=3000)) is None
    info = manager.wait_info("s2")
    assert info is not None and "held back for job big" in info.reason
    assert manager.wakeable() == []
    manager.release(b)
    manager.release(small)
    assert manager.wakeable() == [("big", 50)]
    assert manager.wakeable() == []  # named once until refused again
    assert manager.try_reserve("s2", req(memory_mb=3000)) is None
    assert manager.try_reserve("big", req(memory_mb=8000)) is not None
    assert manager.try_reserve("s2", req(memory_mb=2000)) is not None


def test_starving_gpu_job_holds_the_device_that_frees_first() -> None:
    """A starving GPU job keeps newcomers off the device it would get."""
    clock = FakeClock()
    manager = make(None, SimulatedGPUs([10000, 10000]), clock=clock)
    on0 = manager.try_reserve("a", req(gpu_memory_mb=6000))
    on1 = manager.try_reserve("b", req(gpu_memory_mb=6000))
    assert on0 is not None and on1 is not None
    assert manager.try_reserve("big", req(gpu_memory_mb=9000)) is None
    clock.advance(manager.starvation_seconds + 1)
    manager.release(on1)
    assert manager.try_reserve("new", req(gpu_memory_mb=6000)) is None
    assert manager.try_reserve("cpu-only", None) is not None
    big = manager.try_reserve("big", req(gpu_memory_mb=9000))
    assert big is not None and big.gpus == on1.gpus


def test_wakeable_names_only_jobs_that_fit_together() -> None:
    """A release wakes as many waiting jobs as it can hold, by priority."""
    manager = make(ResourceLimits(max_concurrent_jobs=2))
    running = [manager.try_reserve(j, None) for j in "ab"]
    assert manager.try_reserve("low", None, priority=10) is None
    assert manager.try_reserve("high", None, priority=90) is None
    assert manager.wakeable() == []
    manager.release(running[0])
    assert manager.wakeable() == [("high", 90)]


def test_forgotten_and_stale_waiters_are_dropped() -> None:
    """A canceled waiting job is forgotten; one unseen for stale_seconds too."""
    clock = FakeClock()
    manager = make(ResourceLimits(max_concurrent_jobs=1), clock=clock)
    assert manager.try_reserve("a", None) is not None
    assert manager.try_reserve("b", None) is None
    assert manager.try_reserve("c", None) is None
    manager.forget("b")
    assert manager.waiting_jobs == 1
    clock.advance(manager.stale_seconds + 1)
    manager.wakeable()
    assert manager.waiting_jobs == 0


def test_recheck_delay_doubles_up_to_the_cap() -> None:
    """A job refused again and again is looked at less often, up to a cap."""
    manager = make(ResourceLimits(max_concurrent_jobs=1))
    manager.try_reserve("a", None)
    delays = []
    for _ in range(6):
        manager.try_reserve("b", None)
        delays.append(manager.recheck_delay("b"))
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


async def test_wait_changed_wakes_on_release_and_times_out_on_the_clock() -> None:
    """wait_changed returns on a release, or when the manager's clock runs out."""
    clock = FakeClock()
    manager = make(ResourceLimits(max_concurrent_jobs=1), clock=clock)
    held = manager.try_reserve("a", None)
    waiter = asyncio.ensure_future(manager.wait_changed(5.0))
    await asyncio.sleep(0)
    assert not waiter.done()
    manager.release(held)
    async with asyncio.timeout(5):
        await waiter

    timed = asyncio.ensure_future(manager.wait_changed(5.0))
    async with asyncio.timeout(5):
        while not clock.sleepers:
            await asyncio.sleep(0)
    await clock.advance_async(5.0)
    assert timed.done()


# ---------------------------------------------------------------- report


def test_snapshot_has_exactly_the_documented_keys() -> None:
    """The _resources body: limits, usage, reserved, running_jobs, gpus."""
    gpus = SimulatedGPUs([10000, 24000], names=["A", "B"])
    manager = make(ResourceLimits(max_concurrent_jobs=4), FakeHost(), gpus)
    gpus.set_used(1, 1500)
    manager.try_reserve("a", req(memory_mb=1000, gpu_memory_mb=6000))
    snap = manager.snapshot()
    assert set(snap) == {"limits", "usage", "reserved", "running_jobs", "gpus"}
    assert snap["limits"] == {
        "max_concurrent_jobs": 4,
        "max_memory_mb": None,
        "max_cpu_percent": None,
        "max_gpu_memory_mb": None,
    }
    assert snap["usage"] == {
        "memory_used_mb": 2000,
        "memory_total_mb": 16000,
        "cpu_percent": 10.0,
    }
    assert snap["reserved"] == {"memory_mb": 1000, "gpu_memory_mb": 6000}
    assert snap["running_jobs"] == 1
    assert snap["gpus"] == [
        {
            "index": 0,
            "name": "A",
            "memory_total_mb": 10000,
            "memory_used_mb": 0,
            "memory_reserved_mb": 0,
        },
        {
            "index": 1,
            "name": "B",
            "memory_total_mb": 24000,
            "memory_used_mb": 1500,
            "memory_reserved_mb": 6000,
        },
    ]


def test_a_raising_probe_is_ignored() -> None:
    """A probe that raises reads as absent; the next probe answers."""

    class Broken:
        def read_host(self) -> None:
            raise OSError("no /proc")

        def read_gpus(self) -> None:
            raise OSError("no driver")

    manager = make(None, Broken(), FakeHost(used=3000))
    host = manager.read_host()
    assert host is not None and host.memory_used_mb == 3000
    assert manager.read_gpus() == []


# ---------------------------------------------------------------- probes


def test_psutil_probe_reads_the_host() -> None:
    """The psutil probe reports plausible memory figures and a CPU percentage."""
    probe = PsutilProbe()
    probe.open()
    host = probe.read_host()
    assert 0 < host.memory_used_mb <= host.memory_total_mb
    assert 0.0 <= host.cpu_percent <= 100.0
    assert probe.read_gpus() is None


def test_psutil_probe_cpu_is_busy_share_between_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CPU use is computed from cpu_times deltas, never by sleeping."""
    Times = namedtuple("Times", "user system idle iowait")
    samples = iter([Times(50, 0, 50, 0), Times(50, 0, 50, 0.1), Times(125, 0, 75, 0)])
    monkeypatch.setattr(probes_module.psutil, "cpu_times", lambda: next(samples))
    monkeypatch.setattr(probes_module.psutil, "cpu_count", lambda: 1)
    probe = PsutilProbe(min_sample_seconds=0.5)
    assert probe._sample_cpu() == 50.0  # since boot
    assert probe._sample_cpu() == 50.0  # 0.1 s later: too short, kept
    assert probe._sample_cpu() == 75.0  # 75 busy of 100 since the first sample


# ---------------------------------------------------------------- helpers


def test_cuda_env_lists_devices_in_pci_order() -> None:
    """cuda_env gives CUDA_VISIBLE_DEVICES and the PCI bus order NVML uses."""
    assert cuda_env([1, 3]) == {
        "CUDA_VISIBLE_DEVICES": "1,3",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }
    assert cuda_env([])["CUDA_VISIBLE_DEVICES"] == ""
    with pytest.raises(ValueError, match="non-negative"):
        cuda_env([-1])


def test_simulated_gpus_validate_their_settings() -> None:
    """Sizes must be positive, names match sizes, set_used stays in range."""
    with pytest.raises(ValueError, match="positive"):
        SimulatedGPUs([0])
    with pytest.raises(ValueError, match="one name per GPU"):
        SimulatedGPUs([1000], names=["a", "b"])
    gpus = SimulatedGPUs([1000])
    with pytest.raises(IndexError, match="no simulated GPU 1"):
        gpus.set_used(1, 10)
    with pytest.raises(ValueError, match="between 0 and 1000"):
        gpus.set_used(0, 2000)
    assert gpus.read_gpus()[0].name == "Simulated GPU 0"
    assert gpus.read_host() is None
