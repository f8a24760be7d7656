"""The JobStore contract: the durable truth about every job."""

from __future__ import annotations

import abc
import asyncio
import builtins
import json
import logging
import typing
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring as _quote
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from backgrounder.clock import Clock
from backgrounder.errors import CorruptJobError
from backgrounder.models import (
    ErrorInfo,
    Job,
    JobPage,
    JobStatus,
    Progress,
    ResourceRequest,
)

__all__ = [
    "APPEND_ERROR",
    "JSON_FIELDS",
    "REQUIRED_FIELDS",
    "TIME_FIELDS",
    "JobStore",
    "Update",
    "decode_row",
    "decode_values",
    "encode_field",
    "from_epoch",
    "read_job",
    "read_jobs",
    "refuse_missing_required",
    "to_epoch",
]

logger = logging.getLogger(__name__)


def _may_be_none(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


#: Pseudo-field for ``update``: append this ErrorInfo to ``errors`` atomically.
APPEND_ERROR = "append_error"

#: Job fields that always have a value: an update cannot set them to None.
REQUIRED_FIELDS = frozenset(
    name
    for name, info in Job.model_fields.items()
    if info.is_required() or not _may_be_none(info.annotation)
)


def refuse_missing_required(fields: Mapping[str, Any]) -> None:
    """Raise ValueError if an update would set a required field to None."""
    for name, value in fields.items():
        if value is None and name in REQUIRED_FIELDS:
            raise ValueError(f"{name!r} is a required job field; it cannot be None")


#: Job fields stored as JSON text.
JSON_FIELDS = frozenset(
    {"params", "resources", "progress", "assets", "error", "errors"}
)
#: Job fields stored as epoch seconds (floats).
TIME_FIELDS = frozenset(
    {
        "created_at",
        "started_at",
        "finished_at",
        "updated_at",
        "lease_expires_at",
        "run_after",
    }
)


def to_epoch(value: datetime | None) -> float | None:
    """Return epoch seconds for an aware datetime (None stays None)."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError(f"datetime must be timezone-aware (got {value!r})")
    return value.timestamp()


def from_epoch(value: float | None) -> datetime | None:
    """Return an aware UTC datetime for epoch seconds (None stays None)."""
    return None if value is None else datetime.fromtimestamp(value, UTC)


_FIXED_MODELS = (Progress, ErrorInfo, ResourceRequest)


def encode_field(name: str, value: Any) -> Any:
    """Encode one Job field for storage: JSON text, epoch float, or a plain value."""
    if value is None:
        return None
    if name in JSON_FIELDS or name == APPEND_ERROR:
        try:
            if isinstance(value, _FIXED_MODELS):
                # Fixed schemas with no free-form values (so nothing
                # non-finite): pydantic's own JSON is the same text, in one call.
                return value.model_dump_json()
            if name == "errors" and isinstance(value, list):
                return "[" + ",".join(e.model_dump_json() for e in value) + "]"
        except PydanticSerializationError:
            pass  # a lone surrogate in a message: json escapes it below
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        elif name == "errors":
            value = [e.model_dump(mode="json") for e in value]
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    if name in TIME_FIELDS:
        return to_epoch(value)
    if name == "cancel_requested":
        return int(bool(value))
    if name == "status":
        return str(value)
    return value


_TEXT, _RAW, _BOOL, _NUMBER, _TIME = "text", "raw", "bool", "number", "time"
_NUMBER_FIELDS = frozenset(
    {"priority", "attempt", "retries", "max_retries", "timeout_seconds"}
)
_FIELD_NAMES = tuple(Job.model_fields)
_KINDS = tuple(
    _RAW
    if name in JSON_FIELDS
    else _BOOL
    if name == "cancel_requested"
    else _TIME
    if name in TIME_FIELDS
    else _NUMBER
    if name in _NUMBER_FIELDS
    else _TEXT
    for name in _FIELD_NAMES
)
_PREFIXES = tuple(f'"{name}":' for name in _FIELD_NAMES)
#: Epoch seconds pydantic reads exactly as seconds: it takes larger numbers
#: for milliseconds, and gets the fraction of a negative one wrong.
_PLAIN_EPOCH_LIMIT = 1e10


class _Unusual(Exception):
    """A stored value the one-document decode does not take as it is."""


def _json_value(kind: str, value: Any) -> str:
    """Return the JSON text of one stored value, or raise _Unusual."""
    kind_of = type(value)
    if kind is _TEXT:
        if kind_of is str:
            return _quote(value)
    elif kind is _RAW:
        if kind_of is str:
            return value  # type: ignore[no-any-return]
    elif kind is _BOOL:
        if value == 0 or value == 1:
            return "true" if value else "false"
    elif kind_of is int or kind_of is float:
        if kind is _NUMBER or 0 <= value < _PLAIN_EPOCH_LIMIT:
            return repr(value)
        try:
            return '"' + datetime.fromtimestamp(value, UTC).isoformat() + '"'
        except (ValueError, OverflowError, OSError):
            pass  # decode_row names what is wrong with it
    raise _Unusual


def decode_values(values: Sequence[Any]) -> Job:
    """Build a Job from a SQLite row: one value per field, in ``Job.model_fields``
    order, typed as SQLite returns them (None for an absent one).

    The values become one JSON document that pydantic parses and validates in
    one call: JSON columns are spliced in as they are stored, text is escaped,
    numbers are written as they are (epoch seconds from 1970 to 2286 too, which
    pydantic reads as UTC datetimes; others as ISO text). This costs about half
    of ``decode_row``, which parses each column on its own. A value of another
    type than its column's, or text pydantic's JSON parser refuses (a lone
    surrogate escaped in a message), takes the ``decode_row`` path, which reads
    it or raises.
    """
    try:
        parts = [
            prefix + _json_value(kind, value)
            for kind, prefix, value in zip(_KINDS, _PREFIXES, values, strict=True)
            if value is not None
        ]
        return Job.model_validate_json("{" + ",".join(parts) + "}")
    except (_Unusual, ValidationError):
        return decode_row(dict(zip(_FIELD_NAMES, values, strict=True)))


#: What decoding a damaged record raises: a value of the wrong kind, bad JSON,
#: a time out of range, a missing field.
_UNREADABLE = (ValueError, TypeError, OverflowError, KeyError, IndexError)


def read_job(decode: Callable[[Any], Job], record: Any, job_id: Any, store: str) -> Job:
    """Return ``decode(record)``; raise CorruptJobError naming the job if it fails."""
    try:
        return decode(record)
    except _UNREADABLE as exc:
        raise CorruptJobError(str(job_id), store, exc) from exc


def read_jobs(
    decode: Callable[[Any], Job], records: Iterable[tuple[Any, Any]], store: str
) -> builtins.list[Job | None]:
    """Decode each ``(job_id, record)``; a damaged one is logged and gives None."""
    jobs: builtins.list[Job | None] = []
    for job_id, record in records:
        try:
            jobs.append(read_job(decode, record, job_id, store))
        except CorruptJobError as exc:
            logger.error(
                "job %s left out: %s",
                exc.job_id,
                exc,
                extra={"event": "store.corrupt_job", "job_id": exc.job_id},
            )
            jobs.append(None)
    return jobs


def decode_row(row: Mapping[str, Any]) -> Job:
    """Build a Job from stored columns (JSON text and epoch floats)."""
    data: dict[str, Any] = {}
    for name in Job.model_fields:
        value = row.get(name)
        if value is None:
            continue
        if name in JSON_FIELDS:
            value = json.loads(value)
        elif name in TIME_FIELDS:
            value = from_epoch(float(value))
        elif name == "cancel_requested":
            value = bool(int(value))
        data[name] = value
    return Job.model_validate(data)


@dataclass(frozen=True, slots=True)
class Update:
    """One compare-and-set write for ``JobStore.update_many``: the arguments of
    ``JobStore.update`` as a value."""

    job_id: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    expect_status: Collection[JobStatus] | None = None
    expect_attempt: int | None = None
    expect_worker: str | None = None
    expect_cancel_requested: bool | None = None

    def expectations(self) -> dict[str, Any]:
        """The compare-and-set conditions, as keyword arguments of ``update``."""
        return {
            "expect_status": self.expect_status,
            "expect_attempt": self.expect_attempt,
            "expect_worker": self.expect_worker,
            "expect_cancel_requested": self.expect_cancel_requested,
        }


class JobStore(abc.ABC):
    """Where jobs live. Every write changes only the fields it names, atomically.

    Transitions are compare-and-set on the job's status, attempt and worker, so a
    worker that lost its lease can never overwrite the attempt that replaced it.
    """

    #: A short name for messages and health reports ("sqlite", "redis").
    name: str = "store"

    @abc.abstractmethod
    async def open(self, clock: Clock) -> None:
        """Connect and create what is missing. Raises StoreError naming the cause."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads. Safe to call twice."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Check the store answers and accepts writes; raise StoreError if not."""

    @abc.abstractmethod
    async def create(
        self, job: Job, *, idempotency_expires_at: datetime | None = None
    ) -> tuple[Job, bool]:
        """Insert ``job``, or return the live job holding its idempotency key.

        Two concurrent calls with one key make one job: the key is unique in the
        store. A key whose expiry has passed is released first.

        Returns:
            The stored job and True, or the existing job with the key and False.
        """

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job | None:
        """Return the job, or None when no job has that id."""

    @abc.abstractmethod
    async def list(
        self,
        *,
        status: JobStatus | None = None,
        task: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobPage:
        """Return jobs newest first by submission order, after ``cursor``.

        Raises:
            ValueError: The cursor is not one this store handed out.
        """

    @abc.abstractmethod
    async def update(
        self,
        job_id: str,
        fields: Mapping[str, Any],
        *,
        expect_status: Collection[JobStatus] | None = None,
        expect_attempt: int | None = None,
        expect_worker: str | None = None,
        expect_cancel_requested: bool | None = None,
    ) -> Job | None:
        """Set ``fields`` if the job matches every expectation, in one atomic step.

        ``expect_cancel_requested=False`` makes the write fail once a cancel was
        requested, so a job whose cancel was accepted can never end ``done``.

        ``fields`` maps Job field names to values; the key ``append_error`` appends
        an ErrorInfo to ``errors``. ``updated_at`` is always set to the clock's now.

        Returns:
            The job after the write, or None when it does not exist or did not match.
        """

    async def get_many(self, job_ids: Sequence[str]) -> builtins.list[Job | None]:
        """Return the jobs (None for an unknown id), in the order of ``job_ids``.

        The default calls ``get`` for each id concurrently; stores override it
        with one round trip.
        """
        return builtins.list(await asyncio.gather(*map(self.get, job_ids)))

    async def apply(self, update: Update) -> bool:
        """Make one compare-and-set write; return whether it landed.

        ``update`` without the job read back, for writers that only need to know
        the outcome. The default calls ``update``; a store that can skip reading
        the row back overrides it.
        """
        landed = await self.update(
            update.job_id, update.fields, **update.expectations()
        )
        return landed is not None

    async def update_many(self, updates: Sequence[Update]) -> builtins.list[Job | None]:
        """Apply each compare-and-set write on its own; return each one's result.

        Each write succeeds or misses as ``update`` would; one missing does not
        stop the others. If any raises, the store's error is raised and the
        writes that did not raise may have landed. The default calls ``update``
        for each concurrently; stores override it with one round trip.
        """
        return builtins.list(
            await asyncio.gather(
                *(self.update(u.job_id, u.fields, **u.expectations()) for u in updates)
            )
        )

    @abc.abstractmethod
    async def find_expired(
        self, now: datetime, *, limit: int = 100
    ) -> builtins.list[Job]:
        """Return running jobs whose lease ran out before ``now``."""

    @abc.abstractmethod
    async def find_queued(
        self, *, updated_before: datetime | None = None, limit: int = 1000
    ) -> builtins.list[Job]:
        """Return queued jobs, oldest first (only those unchanged since a time)."""

    @abc.abstractmethod
    async def count_by_status(self) -> dict[JobStatus, int]:
        """Return how many jobs are in each status."""
