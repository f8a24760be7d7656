"""Store/queue pairs the reliability suites run against, and a read-only queue view.

Each backend is a ``Backend``: a name, a way to build a fresh store and queue in
a folder, and a way to read which ids the queue holds (waiting, and claimed but
not yet acknowledged) without changing it. The suites take the list
``BACKENDS`` as a pytest parameter, so a new pair is one more entry here.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from backgrounder.queue.base import JobQueue
from backgrounder.queue.memory import MemoryQueue
from backgrounder.store.base import JobStore
from backgrounder.store.sqlite import SqliteStore

__all__ = ["BACKENDS", "Backend", "QueueView"]


@dataclass(frozen=True)
class QueueView:
    """What the queue holds, read without changing it.

    Attributes:
        waiting: Every id waiting to be claimed (ready or delayed), once per
            place it is held: a repeated id is a duplicate.
        claimed: Ids handed out by ``claim`` and not yet acknowledged.
        lost: Ids the queue lists as waiting but can never hand out.
    """

    waiting: list[str]
    claimed: list[str]
    lost: list[str]

    def duplicates(self) -> list[str]:
        """Return the ids held more than once, waiting or claimed."""
        counts = Counter([*self.waiting, *self.claimed])
        return sorted(job_id for job_id, n in counts.items() if n > 1)


@dataclass(frozen=True)
class Backend:
    """A store/queue pair for the suites.

    Attributes:
        name: The pytest id.
        make: Build a fresh, unopened store and queue under a folder.
        inspect: Read the queue's contents (read-only).
    """

    name: str
    make: Callable[[Path], tuple[JobStore, JobQueue]]
    inspect: Callable[[JobQueue], Awaitable[QueueView]]

    def __repr__(self) -> str:
        return self.name


def _make_sqlite_memory(folder: Path) -> tuple[JobStore, JobQueue]:
    return SqliteStore(folder / f"jobs-{uuid.uuid4().hex[:8]}.db"), MemoryQueue()


async def _inspect_memory(queue: JobQueue) -> QueueView:
    """Read MemoryQueue internals: live heap entries and the claimed map.

    A heap entry is live when it carries the sequence number ``_entries`` holds
    for its id (a ready entry also needs a due time of 0, as ``claim`` checks).
    An id in ``_entries`` without a live heap entry could never be claimed, so
    it is reported as lost.
    """
    assert isinstance(queue, MemoryQueue)
    entries = queue._entries

    def live(job_id: str, seq: int, *, ready: bool) -> bool:
        entry = entries.get(job_id)
        return entry is not None and entry[2] == seq and (entry[0] == 0.0 or not ready)

    waiting = [j for _, seq, j in queue._ready if live(j, seq, ready=True)]
    waiting += [j for _, seq, j in queue._delayed if live(j, seq, ready=False)]
    lost = sorted(set(entries) - set(waiting))
    return QueueView(waiting=waiting, claimed=list(queue._claimed), lost=lost)


#: The pairs every reliability suite runs on. Add "redis" here once the Redis
#: plugin exposes RedisStore and RedisQueue: make() builds both on a fresh key
#: prefix (uuid) of BACKGROUNDER_REDIS_URL or fakeredis, inspect() reads the
#: queue's ready, delayed and in-flight sorted sets.
BACKENDS: list[Backend] = [
    Backend("sqlite-memory", _make_sqlite_memory, _inspect_memory),
]
