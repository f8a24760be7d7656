"""The in-process event bus behind ``JobManager.events`` and the job-event hook."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from backgrounder.models import JobEvent

__all__ = ["EventBus"]


class EventBus:
    """Fan-out of job events to subscribers in this process.

    A subscriber's queue is bounded; when a slow reader lets it fill, the oldest
    progress events are dropped (status events are kept), since a reader only needs
    the latest progress.
    """

    def __init__(self, maxsize: int = 256) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[JobEvent]]] = defaultdict(set)
        self._maxsize = maxsize

    def has_subscribers(self, job_id: str) -> bool:
        """Return True when somebody listens to ``job_id``."""
        return bool(self._subscribers.get(job_id))

    def subscribe(self, job_id: str) -> asyncio.Queue[JobEvent]:
        """Return a queue that receives the job's events until unsubscribed."""
        queue: asyncio.Queue[JobEvent] = asyncio.Queue(self._maxsize)
        self._subscribers[job_id].add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[JobEvent]) -> None:
        """Stop delivering to ``queue``."""
        subscribers = self._subscribers.get(job_id)
        if subscribers is None:
            return
        subscribers.discard(queue)
        if not subscribers:
            del self._subscribers[job_id]

    def publish(self, event: JobEvent) -> None:
        """Deliver ``event`` to every subscriber of its job, without waiting."""
        for queue in self._subscribers.get(event.job.id, ()):
            if queue.full():
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    pass
            queue.put_nowait(event)
