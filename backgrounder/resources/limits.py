"""ResourceLimits: what one worker process may use at once."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ResourceLimits"]


class ResourceLimits(BaseModel):
    """Limits for one worker process; None means no limit of that kind."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_concurrent_jobs: int | None = Field(
        None, gt=0, description="Jobs running at once; lowers worker_count only."
    )
    max_memory_mb: int | None = Field(
        None, gt=0, description="Host memory the running jobs may reserve, MB."
    )
    max_cpu_percent: float | None = Field(
        None, gt=0, le=100, description="No job starts while host CPU is above this."
    )
    max_gpu_memory_mb: int | None = Field(
        None, gt=0, description="GPU memory jobs may reserve on each device, MB."
    )
