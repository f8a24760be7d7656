"""The task every throughput benchmark runs: an empty coroutine, as the peers run
(``noop`` in ``bench/peers.py``).

``backgrounder worker bench.tasks:registry`` loads it in a worker process.
"""

from __future__ import annotations

from typing import Any

from backgrounder import Job, TaskRegistry

__all__ = ["Empty", "registry"]


class Empty:
    """Does nothing and returns None: the cost measured is the queue's alone."""

    async def execute(self, job: Job, ctx: Any) -> None:
        return None


registry = TaskRegistry()
registry.add("noop", Empty())
