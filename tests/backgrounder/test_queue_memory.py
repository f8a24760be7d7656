"""MemoryQueue: priority, FIFO, delays, and re-pushes that keep a job's place."""

from __future__ import annotations

from backgrounder import TaskRegistry
from backgrounder.queue.memory import MemoryQueue
from backgrounder_testing import FakeClock
from tests.backgrounder.casekit import Probe, drive_until, started
from tests.conftest import ManagerFactory, wait_for


async def _drain(queue: MemoryQueue) -> list[str]:
    taken = []
    while (job_id := queue.claim_nowait(lease_seconds=30)) is not None:
        taken.append(job_id)
        await queue.ack(job_id)
    return taken


async def test_queue_higher_priority_first_fifo_within() -> None:
    """Higher priority first; equal priorities in push order."""
    queue = MemoryQueue()
    await queue.open(FakeClock())
    for job_id, priority in [("a", 10), ("b", 90), ("c", 10), ("d", 90), ("e", 50)]:
        await queue.push(job_id, priority=priority)

    assert await _drain(queue) == ["b", "d", "e", "a", "c"]


async def test_queue_repush_of_a_waiting_job_keeps_its_place() -> None:
    """Pushing a waiting id again (restore, stale pass) does not move it back."""
    queue = MemoryQueue()
    await queue.open(FakeClock())
    await queue.push("old", priority=50)
    await queue.push("new", priority=50)
    await queue.push("old", priority=50)

    assert await _drain(queue) == ["old", "new"]
    assert await queue.size() == 0


async def test_queue_delayed_job_waits_for_the_clock() -> None:
    """A delayed push is claimable only once the clock reaches its time."""
    clock = FakeClock()
    queue = MemoryQueue()
    await queue.open(clock)
    await queue.push("later", priority=50, delay_seconds=5)
    clock.advance(1)
    # A re-push takes the delay it is given: the remaining 4 s keeps it waiting.
    await queue.push("later", priority=50, delay_seconds=4)

    assert queue.claim_nowait(lease_seconds=30) is None
    clock.advance(3.9)
    assert queue.claim_nowait(lease_seconds=30) is None
    clock.advance(0.11)
    assert queue.claim_nowait(lease_seconds=30) == "later"


async def test_queue_repush_without_delay_makes_a_waiting_job_ready() -> None:
    """A re-push with no delay (a resource wait that ended) is claimable at once."""
    clock = FakeClock()
    queue = MemoryQueue()
    await queue.open(clock)
    await queue.push("waiting", priority=50, delay_seconds=8)
    await queue.push("waiting", priority=50)

    assert queue.claim_nowait(lease_seconds=30) == "waiting"
    assert await queue.size() == 0


async def test_queue_job_waiting_past_a_lease_keeps_fifo_order(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """Jobs queued longer than lease_seconds still run before later submissions."""
    probe = Probe()
    registry = TaskRegistry()
    registry.add("probe", probe)
    manager = await make_manager(registry, clock=clock, worker_count=1, lease_seconds=3)
    x = await manager.submit("probe", {"name": "X", "block": True})
    await started(probe, "X")
    a = await manager.submit("probe", {"name": "a"})
    b = await manager.submit("probe", {"name": "b"})
    await drive_until(clock, manager, x.id, lambda j: True, limit=0)
    for _ in range(20):  # 5 s: the stale-job pass sees a and b
        await clock.advance_async(0.25)
        await manager.get(a.id)
    c = await manager.submit("probe", {"name": "c"})
    for _ in range(8):
        await clock.advance_async(0.25)
        await manager.get(a.id)

    probe.gates["X"].set()
    for job_id in (a.id, b.id, c.id):
        await wait_for(manager, job_id, "done")
    assert probe.order == ["X", "a", "b", "c"]
