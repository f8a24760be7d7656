"""Helpers shared by the process-isolation tests: watch child processes."""

from __future__ import annotations

from collections.abc import Iterator

import psutil
import pytest

from backgrounder import JobManager, JobStatus


def spawned_children() -> list[psutil.Process]:
    """Live children of this process started by multiprocessing's spawn (ours)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            if any("spawn_main" in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.fixture(autouse=True)
def no_child_left_behind() -> Iterator[None]:
    """Fail a test that leaves a child process running after its managers close."""
    yield
    left = spawned_children()
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    assert not left, f"child processes left behind: {[p.pid for p in left]}"


def gone(pid: int) -> bool:
    """True when no process has ``pid`` any more (or only its zombie is left)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def child_pid(manager: JobManager, job_id: str) -> int:
    """Wait until the job's runner reports the pid of the child it runs in."""
    async for event in manager.events(job_id):
        message = event.job.progress.message
        if event.job.status == JobStatus.running and message and message.isdigit():
            return int(message)
    raise AssertionError(f"job {job_id} ended before its child reported a pid")
