"""Jobs per second through the embedded default: SQLite store + memory queue.

Submits N ``NoopRunner(sleep_ms=0)`` jobs to a JobManager with 10 concurrent slots,
then waits for the last one, and prints the submit rate and the end-to-end rate.

    python bench/throughput_embedded.py [--jobs 10000] [--slots 10] [--db PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from backgrounder import JobManager, JobStatus, NoopRunner, TaskRegistry


async def run(jobs: int, slots: int, db: Path) -> dict[str, float]:
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0))
    async with JobManager(db_path=db, registry=registry, worker_count=slots) as manager:
        started = time.perf_counter()
        ids = [(await manager.submit("noop")).id for _ in range(jobs)]
        submitted = time.perf_counter()
        last = ids[-1]
        async for event in manager.events(last):
            if event.job.is_terminal:
                break
        while True:  # the last submitted may finish before a few earlier ones
            counts = await manager.store.count_by_status()
            if counts[JobStatus.done] + counts[JobStatus.failed] >= jobs:
                break
            await asyncio.sleep(0.01)
        finished = time.perf_counter()
        counts = await manager.store.count_by_status()
    return {
        "jobs": jobs,
        "slots": slots,
        "done": counts[JobStatus.done],
        "failed": counts[JobStatus.failed],
        "submit_seconds": submitted - started,
        "total_seconds": finished - started,
        "submit_per_second": jobs / (submitted - started),
        "jobs_per_second": jobs / (finished - started),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--slots", type=int, default=10)
    parser.add_argument("--db", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        db = args.db or Path(folder) / "bench.db"
        result = asyncio.run(run(args.jobs, args.slots, db))
    print(
        f"{result['jobs']} NoopRunner(sleep_ms=0) jobs, {result['slots']} slots, "
        f"embedded default (SQLite + memory queue)"
    )
    print(
        f"  submitted in {result['submit_seconds']:.2f} s "
        f"({result['submit_per_second']:.0f} submits/s)"
    )
    print(
        f"  all finished in {result['total_seconds']:.2f} s: "
        f"{result['jobs_per_second']:.0f} jobs/s "
        f"(done {result['done']}, failed {result['failed']})"
    )


if __name__ == "__main__":
    main()
