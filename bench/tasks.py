"""The task every throughput benchmark runs: an empty coroutine, as the peers run
(``noop`` in ``bench/peers.py``); and ``stamp``, for pickup in a worker process.

``backgrounder worker bench.tasks:registry`` loads it in a worker process.
"""

from __future__ import annotations

import time
from typing import Any

from backgrounder import Job, TaskRegistry

__all__ = ["Empty", "Stamp", "registry"]


class Empty:
    """Does nothing and returns None: the cost measured is the queue's alone."""

    async def execute(self, job: Job, ctx: Any) -> None:
        return None


class Stamp:
    """Returns the wall-clock time its execute started, for the pickup benchmark
    of a worker in another process (both read the same system clock)."""

    async def execute(self, job: Job, ctx: Any) -> dict[str, float]:
        return {"started": time.time()}


registry = TaskRegistry()
registry.add("noop", Empty())
registry.add("stamp", Stamp())
