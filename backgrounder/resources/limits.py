"""ResourceLimits: what the jobs of one worker process may use at once."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from backgrounder.errors import ConfigurationError

__all__ = ["ResourceLimits"]


class ResourceLimits(BaseModel):
    """Limits for the jobs of one worker process; None means no limit of that kind.

    ``ResourceLimits(max_concurrent_jobs=4, max_gpu_memory_mb=20000)``. Every
    value must be a positive number; ``max_cpu_percent`` is at most 100.

    Raises:
        ConfigurationError: A value is not a positive number (the message names
            the field and the value).

    Added in 0.1.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    max_concurrent_jobs: int | None = Field(
        None, description="Jobs running at once; can only lower worker_count."
    )
    max_memory_mb: int | None = Field(
        None, description="Host memory all running jobs may reserve together, MB."
    )
    max_cpu_percent: float | None = Field(
        None,
        description="No job starts while the host's CPU use is above this (0-100].",
    )
    max_gpu_memory_mb: int | None = Field(
        None, description="GPU memory jobs may reserve on each device, MB."
    )

    def __init__(self, **data: Any) -> None:
        """Validate the limits; see the class docstring."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'limits'}: "
                f"{err['msg'].removeprefix('Value error, ')}"
                for err in exc.errors()
            )
            raise ConfigurationError(f"invalid ResourceLimits: {problems}") from exc

    @field_validator(
        "max_concurrent_jobs", "max_memory_mb", "max_gpu_memory_mb", mode="before"
    )
    @classmethod
    def _positive_int(cls, value: Any, info: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"{info.field_name} must be a positive integer or None (got {value!r})"
            )
        if value <= 0:
            raise ValueError(
                f"{info.field_name} must be a positive integer or None (got {value!r})"
            )
        return value

    @field_validator("max_cpu_percent", mode="before")
    @classmethod
    def _percent(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(
                f"max_cpu_percent must be a number in (0, 100] or None (got {value!r})"
            )
        if not 0 < value <= 100:
            raise ValueError(
                f"max_cpu_percent must be a number in (0, 100] or None (got {value!r})"
            )
        return float(value)
