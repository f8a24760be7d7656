"""Job queues: the JobQueue contract and the built-in memory queue."""

from backgrounder.queue.base import JobQueue
from backgrounder.queue.memory import MemoryQueue

__all__ = ["JobQueue", "MemoryQueue"]
