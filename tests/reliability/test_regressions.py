"""Bugs the reliability suites found, each pinned by the smallest example."""

from __future__ import annotations

from backgrounder.models import ResourceRequest
from backgrounder.resources import ResourceManager


def test_two_attempts_of_one_job_hold_two_reservations() -> None:
    """Releasing an old attempt's reservation keeps the new attempt's counted.

    A sync runner keeps its slot after its attempt timed out, while the retry of
    the same job starts in the same process: both hold memory until each ends.
    """
    resources = ResourceManager(None, [])
    old = resources.try_reserve("job-1", ResourceRequest(memory_mb=100))
    new = resources.try_reserve("job-1", ResourceRequest(memory_mb=100))
    assert old is not None and new is not None
    assert resources.running_jobs == 2
    assert resources.reserved_memory_mb() == 200

    resources.release(old)

    assert resources.running_jobs == 1
    assert resources.reserved_memory_mb() == 100
    resources.release(new)
    resources.release(new)
    assert resources.running_jobs == 0
