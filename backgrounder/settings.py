"""ManagerSettings: every tunable default of DESIGN.md §5, validated in one place."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ManagerSettings"]


class ManagerSettings(BaseModel):
    """Options of JobManager, setup_backgrounder and ``backgrounder worker``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    worker_count: int = Field(
        1, ge=0, le=10_000, description="Jobs this process runs at once; 0 = API only."
    )
    lease_seconds: float = Field(
        30.0, gt=0, description="A claim's lease; renewed every third of it."
    )
    heartbeat_seconds: float | None = Field(
        None, gt=0, description="Lease renewal interval; default lease_seconds / 3."
    )
    recovery_interval_seconds: float | None = Field(
        None,
        gt=0,
        description="How often expired leases are looked for; default lease / 6.",
    )
    cancel_grace_seconds: float = Field(
        5.0, ge=0, description="Time a runner gets to stop after a cancel request."
    )
    shutdown_grace_seconds: float = Field(
        10.0, ge=0, description="Time running jobs get to finish at shutdown."
    )
    retry_backoff_seconds: float = Field(
        1.0, ge=0, description="First retry delay; it doubles on each retry."
    )
    retry_backoff_max_seconds: float = Field(
        300.0, ge=0, description="The longest retry delay."
    )
    default_timeout_seconds: float | None = Field(
        3600.0, gt=0, description="Timeout when neither job nor task sets one."
    )
    default_max_retries: int = Field(
        0, ge=0, description="Retries when neither job nor task sets them."
    )
    max_params_bytes: int = Field(
        1024 * 1024, gt=0, description="Largest params, in bytes of JSON."
    )
    max_params_depth: int = Field(
        64, gt=0, le=500, description="Deepest nesting allowed in params."
    )
    idempotency_ttl_seconds: float = Field(
        24 * 3600.0, gt=0, description="How long an idempotency key is remembered."
    )
    progress_interval_seconds: float = Field(
        0.25, ge=0, description="At most one progress write per job per interval."
    )
    poll_seconds: float = Field(
        1.0, gt=0, description="Longest wait of one claim call before looking again."
    )
    event_poll_seconds: float = Field(
        0.5, gt=0, description="How often event streams re-read the store."
    )
    expose_tracebacks: bool = Field(
        False, description="Show stored tracebacks in HTTP responses."
    )

    @model_validator(mode="after")
    def _check_intervals(self) -> ManagerSettings:
        if (
            self.heartbeat_seconds is not None
            and self.heartbeat_seconds >= self.lease_seconds
        ):
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be shorter than "
                f"lease_seconds ({self.lease_seconds})"
            )
        return self

    @property
    def heartbeat(self) -> float:
        """Seconds between lease renewals."""
        return self.heartbeat_seconds or self.lease_seconds / 3

    @property
    def recovery_interval(self) -> float:
        """Seconds between scans for expired leases."""
        return self.recovery_interval_seconds or self.lease_seconds / 6
