"""Prometheus metrics, as a plugin on the ``backgrounder_job_event`` hook.

Needs ``prometheus-client`` (the ``metrics`` extra). Counters and histograms
follow the job events of this process; gauges (queue depth, jobs by status,
running jobs, reservations) are read from the manager at each scrape.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from backgrounder.errors import ConfigurationError
from backgrounder.hookspecs import hookimpl
from backgrounder.models import TERMINAL_STATUSES, JobEvent, JobStatus

if TYPE_CHECKING:
    from backgrounder.manager import JobManager

__all__ = ["CONTENT_TYPE", "PrometheusMetrics"]

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600)


class PrometheusMetrics:
    """Job metrics in a registry of their own, fed by job events.

    Pass it with ``plugins=[metrics]`` (``setup_backgrounder(..., metrics=True)``
    does it for you) and serve ``await metrics.render(manager)``.
    """

    def __init__(self, namespace: str = "backgrounder") -> None:
        """Build the metrics in a fresh registry.

        Raises:
            ConfigurationError: prometheus-client is not installed.
        """
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise ConfigurationError(
                "metrics need prometheus-client: pip install 'backgrounder[metrics]'"
            ) from exc
        self._prom = prom
        self.registry = prom.CollectorRegistry(auto_describe=True)
        ns = namespace
        self.submitted = prom.Counter(
            "jobs_submitted",
            "Jobs submitted.",
            ["task"],
            namespace=ns,
            registry=self.registry,
        )
        self.started = prom.Counter(
            "jobs_started",
            "Attempts started.",
            ["task"],
            namespace=ns,
            registry=self.registry,
        )
        self.finished = prom.Counter(
            "jobs_finished",
            "Jobs that reached a final status.",
            ["task", "status"],
            namespace=ns,
            registry=self.registry,
        )
        self.retried = prom.Counter(
            "jobs_retried",
            "Attempts that failed and were queued again.",
            ["task", "code"],
            namespace=ns,
            registry=self.registry,
        )
        self.duration = prom.Histogram(
            "job_duration_seconds",
            "Run time of the final attempt.",
            ["task", "status"],
            namespace=ns,
            registry=self.registry,
            buckets=_DURATION_BUCKETS,
        )
        self.wait = prom.Histogram(
            "job_wait_seconds",
            "Time from submission to the start of the first attempt.",
            ["task"],
            namespace=ns,
            registry=self.registry,
            buckets=_DURATION_BUCKETS,
        )
        self.queue_depth = prom.Gauge(
            "queue_depth",
            "Job ids waiting in the queue.",
            namespace=ns,
            registry=self.registry,
        )
        self.jobs = prom.Gauge(
            "jobs",
            "Jobs in the store by status.",
            ["status"],
            namespace=ns,
            registry=self.registry,
        )
        self.running = prom.Gauge(
            "running_jobs",
            "Jobs running in this process.",
            namespace=ns,
            registry=self.registry,
        )
        self.reserved = prom.Gauge(
            "reserved_mb",
            "Resources reserved by running jobs in this process.",
            ["resource"],
            namespace=ns,
            registry=self.registry,
        )

    def __repr__(self) -> str:
        return "PrometheusMetrics()"

    @hookimpl
    def backgrounder_job_event(self, event: JobEvent) -> None:
        """Count the transition the event shows."""
        if event.kind != "status":
            return
        job = event.job
        if job.status == JobStatus.queued:
            if job.error is not None and job.started_at is None and job.retries:
                self.retried.labels(job.task, str(job.error.code)).inc()
            elif job.updated_at == job.created_at:
                self.submitted.labels(job.task).inc()
        elif job.status == JobStatus.running and not job.cancel_requested:
            self.started.labels(job.task).inc()
            if job.attempt == 1 and job.started_at is not None:
                seconds = (job.started_at - job.created_at).total_seconds()
                self.wait.labels(job.task).observe(max(0.0, seconds))
        elif job.status in TERMINAL_STATUSES:
            self.finished.labels(job.task, str(job.status)).inc()
            if job.started_at is not None and job.finished_at is not None:
                seconds = (job.finished_at - job.started_at).total_seconds()
                self.duration.labels(job.task, str(job.status)).observe(seconds)

    async def render(self, manager: JobManager) -> bytes:
        """Refresh the gauges from ``manager`` and return the exposition text."""
        try:
            self.queue_depth.set(await manager.queue.size())
            for status, count in (await manager.store.count_by_status()).items():
                self.jobs.labels(str(status)).set(count)
        except Exception as exc:
            logger.warning(
                "metrics: could not read queue or store: %s",
                exc,
                extra={"event": "metrics.read_failed"},
            )
        snapshot: dict[str, Any] = manager.resources.snapshot()
        self.running.set(snapshot["running_jobs"])
        for name, value in snapshot["reserved"].items():
            self.reserved.labels(name.removesuffix("_mb")).set(value or 0)
        data: bytes = self._prom.generate_latest(self.registry)
        return data
