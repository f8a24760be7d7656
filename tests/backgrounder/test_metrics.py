"""Prometheus metrics fed by job events."""

from __future__ import annotations

from backgrounder import Job, NoopRunner, RunContext, TaskRegistry
from backgrounder.metrics import PrometheusMetrics
from tests.conftest import ManagerFactory, wait_for


class Fails:
    async def execute(self, job: Job, ctx: RunContext) -> None:
        raise RuntimeError("no")


def _value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in metrics:\n{text}")


async def test_metrics_count_jobs_by_task_and_status(
    make_manager: ManagerFactory,
) -> None:
    """Counters and histograms carry task and status labels with the right values."""
    registry = TaskRegistry()
    registry.add("noop", NoopRunner(sleep_ms=0))
    registry.add("fails", Fails())
    metrics = PrometheusMetrics()
    manager = await make_manager(
        registry, plugins=[metrics], worker_count=2, retry_backoff_seconds=0
    )

    for _ in range(3):
        job = await manager.submit("noop")
        await wait_for(manager, job.id)
    failing = await manager.submit("fails", max_retries=1)
    await wait_for(manager, failing.id, "failed")
    text = (await metrics.render(manager)).decode()

    assert _value(text, 'backgrounder_jobs_submitted_total{task="noop"}') == 3
    assert _value(text, 'backgrounder_jobs_submitted_total{task="fails"}') == 1
    assert _value(text, 'backgrounder_jobs_started_total{task="fails"}') == 2
    assert (
        _value(
            text, 'backgrounder_jobs_retried_total{code="execution_error",task="fails"}'
        )
        == 1
    )
    assert (
        _value(text, 'backgrounder_jobs_finished_total{status="done",task="noop"}') == 3
    )
    assert (
        _value(
            text,
            'backgrounder_job_duration_seconds_count{status="failed",task="fails"}',
        )
        == 1
    )
    assert _value(text, 'backgrounder_jobs{status="done"}') == 3
    assert _value(text, "backgrounder_queue_depth") == 0
    assert _value(text, "backgrounder_running_jobs") == 0
