"""The JobStore contract, proved against every store (see conftest.py)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backgrounder.errors import CorruptJobError
from backgrounder.models import (
    Assets,
    ErrorCode,
    ErrorInfo,
    Job,
    JobStatus,
    Progress,
    ResourceRequest,
    Stage,
)
from backgrounder.store.base import (
    APPEND_ERROR,
    JobStore,
    Update,
    decode_row,
    decode_values,
    encode_field,
    from_epoch,
)
from backgrounder_testing import FakeClock
from tests.contract.conftest import damage


def make_job(clock: FakeClock, **fields: Any) -> Job:
    now = clock.now()
    data: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "task": "embed",
        "params": {"text": "héllo", "n": [1, 2.5, None]},
        "created_at": now,
        "updated_at": now,
    }
    data.update(fields)
    return Job(**data)


async def test_create_then_get_returns_every_field(
    store: JobStore, clock: FakeClock
) -> None:
    job = make_job(
        clock,
        priority=90,
        max_retries=3,
        timeout_seconds=12.5,
        idempotency_key="k1",
        resources=ResourceRequest(memory_mb=256),
        progress=Progress(percent=12.5, stage=Stage.fetch, message="go"),
        run_after=clock.now() + timedelta(seconds=3),
    )
    stored, created = await store.create(
        job, idempotency_expires_at=clock.now() + timedelta(hours=1)
    )
    assert created
    assert stored == job
    assert await store.get(job.id) == job


@given(
    st.datetimes(
        min_value=datetime(1970, 1, 2),
        max_value=datetime(2200, 1, 1),
        timezones=st.just(UTC),
    )
)
def test_stored_times_read_back_to_the_microsecond(when: datetime) -> None:
    """A create returns the job it was given, not a read-back of the stored row,
    so every stored time must read back equal: epoch seconds as a float (SQLite
    REAL, and its shortest repr in a Redis hash) keep every microsecond of any
    date up to 2200."""
    stored = encode_field("created_at", when)
    assert from_epoch(stored) == when
    assert from_epoch(float(repr(stored))) == when


@pytest.mark.parametrize("cancel", [False, True])
@pytest.mark.parametrize("message", ["disk full", "bad byte \udcff"])
def test_stored_values_decode_to_the_job_they_came_from(
    message: str, cancel: bool
) -> None:
    """Stores hand their values back natively (SQLite) or as text (a Redis hash);
    either way, the one-document decode and the field-by-field one give the job
    that was stored, every field set, even text pydantic's JSON cannot parse."""
    clock = FakeClock()
    error = ErrorInfo(code=ErrorCode.timeout, message=message, attempt=2)
    job = make_job(
        clock,
        status=JobStatus.running,
        priority=7,
        attempt=2,
        retries=1,
        max_retries=4,
        timeout_seconds=0.25,
        idempotency_key='k\u00e9y "quoted"',
        resources=ResourceRequest(memory_mb=64, gpus=1),
        progress=Progress(percent=50.0, stage=Stage.fetch, processed=5, total=10),
        assets=Assets(custom={"out": [1, 2.5]}, extra_group={"x": True}),
        error=error,
        errors=[error],
        cancel_requested=cancel,
        worker_id="w-1",
        lease_expires_at=clock.now() + timedelta(seconds=30),
        run_after=clock.now() - timedelta(seconds=1),
        started_at=clock.now(),
        finished_at=clock.now() + timedelta(microseconds=1),
    )
    native = [encode_field(name, getattr(job, name)) for name in Job.model_fields]
    text = [
        None if v is None else repr(v) if isinstance(v, float) else str(v)
        for v in native
    ]
    assert decode_values(native) == job
    assert decode_values(text) == job
    assert decode_row(dict(zip(Job.model_fields, native, strict=True))) == job


async def test_times_far_from_now_read_back_exactly(
    store: JobStore, clock: FakeClock
) -> None:
    """Times before 1970 and after 2286 read back as stored: not as milliseconds,
    and a fraction before 1970 keeps its sign."""
    job = make_job(
        clock,
        run_after=datetime(3000, 1, 1, tzinfo=UTC),
        started_at=datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        finished_at=datetime(1900, 6, 1, 12, tzinfo=UTC),
        lease_expires_at=datetime(9999, 12, 31, tzinfo=UTC),
    )
    await store.create(job)
    assert await store.get(job.id) == job
    page = await store.list()
    assert page.items == [job]


@pytest.mark.parametrize("name", ["task", "status", "errors", "updated_at"])
async def test_an_update_cannot_empty_a_required_field(
    store: JobStore, clock: FakeClock, name: str
) -> None:
    """Setting a field every job has to None is refused before anything is
    written, on every store, and the job reads back as it was."""
    job, _ = await store.create(make_job(clock))
    with pytest.raises(ValueError, match=f"'{name}' is a required job field"):
        await store.update(job.id, {name: None, "priority": 1})
    assert await store.get(job.id) == job


@pytest.mark.parametrize("append_last", [True, False])
async def test_errors_set_and_appended_in_one_update_agree(
    store: JobStore, clock: FakeClock, append_last: bool
) -> None:
    """An update naming ``errors`` and an append to it ends as one SQL UPDATE
    does on every store: the append builds on the stored list, and the one
    named last wins."""
    first = ErrorInfo(code=ErrorCode.timeout, message="first")
    second = ErrorInfo(code=ErrorCode.execution_error, message="second")
    job, _ = await store.create(make_job(clock))
    await store.update(job.id, {APPEND_ERROR: first})
    fields: dict[str, Any] = (
        {"errors": [], APPEND_ERROR: second}
        if append_last
        else {APPEND_ERROR: second, "errors": []}
    )
    updated = await store.update(job.id, fields)
    assert updated is not None
    assert updated.errors == ([first, second] if append_last else [])
    assert await store.get(job.id) == updated


async def test_a_damaged_record_is_named_alone_and_left_out_of_many(
    store: JobStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A job whose record was damaged raises CorruptJobError naming it when read
    alone; reads of many jobs leave it out, log it, and return the rest."""
    good, _ = await store.create(make_job(clock))
    bad, _ = await store.create(make_job(clock))
    await damage(store, bad.id)
    with pytest.raises(CorruptJobError, match=bad.id) as raised:
        await store.get(bad.id)
    assert raised.value.job_id == bad.id
    assert "repair or delete" in str(raised.value)
    assert await store.get_many([bad.id, good.id]) == [None, good]
    assert (await store.list()).items == [good]
    assert await store.find_queued() == [good]
    assert f"job {bad.id} left out" in caplog.text


async def test_get_unknown_id_is_none(store: JobStore) -> None:
    assert await store.get("no-such-job") is None


async def test_idempotency_key_returns_the_live_job(
    store: JobStore, clock: FakeClock
) -> None:
    expires = clock.now() + timedelta(hours=1)
    first, created = await store.create(
        make_job(clock, idempotency_key="same"), idempotency_expires_at=expires
    )
    again, created_again = await store.create(
        make_job(clock, idempotency_key="same"), idempotency_expires_at=expires
    )
    assert created and not created_again
    assert again.id == first.id
    assert (await store.count_by_status())[JobStatus.queued] == 1


async def test_idempotency_key_is_unique_under_concurrency(
    store: JobStore, clock: FakeClock
) -> None:
    expires = clock.now() + timedelta(hours=1)
    results = await asyncio.gather(
        *[
            store.create(
                make_job(clock, idempotency_key="race"),
                idempotency_expires_at=expires,
            )
            for _ in range(20)
        ]
    )
    assert sum(created for _, created in results) == 1
    assert len({job.id for job, _ in results}) == 1


async def test_expired_idempotency_key_is_released(
    store: JobStore, clock: FakeClock
) -> None:
    old, _ = await store.create(
        make_job(clock, idempotency_key="k"),
        idempotency_expires_at=clock.now() + timedelta(seconds=60),
    )
    clock.advance(61)
    new, created = await store.create(
        make_job(clock, idempotency_key="k"),
        idempotency_expires_at=clock.now() + timedelta(seconds=60),
    )
    assert created and new.id != old.id
    released = await store.get(old.id)
    assert released is not None and released.idempotency_key is None


async def test_update_sets_only_named_fields_and_updated_at(
    store: JobStore, clock: FakeClock
) -> None:
    job, _ = await store.create(make_job(clock))
    clock.advance(5)
    updated = await store.update(
        job.id,
        {"progress": Progress(percent=50, stage=Stage.infer), "worker_id": "w1"},
    )
    assert updated is not None
    assert updated.progress.percent == 50 and updated.worker_id == "w1"
    assert updated.updated_at == clock.now()
    assert updated.params == job.params and updated.status == JobStatus.queued
    assert await store.get(job.id) == updated


async def test_update_to_none_clears_the_field(
    store: JobStore, clock: FakeClock
) -> None:
    job, _ = await store.create(make_job(clock, worker_id="w1"))
    updated = await store.update(job.id, {"worker_id": None, "assets": None})
    assert updated is not None and updated.worker_id is None


async def test_compare_and_set_on_status_attempt_and_worker(
    store: JobStore, clock: FakeClock
) -> None:
    job, _ = await store.create(make_job(clock))
    running = await store.update(
        job.id,
        {"status": JobStatus.running, "worker_id": "w1"},
        expect_status={JobStatus.queued},
    )
    assert running is not None and running.status == JobStatus.running
    for expectation in (
        {"expect_status": {JobStatus.queued}},
        {"expect_attempt": 2},
        {"expect_worker": "w2"},
    ):
        miss = await store.update(
            job.id,
            {"status": JobStatus.done},
            **expectation,
        )
        assert miss is None, expectation
    done = await store.update(
        job.id,
        {"status": JobStatus.done},
        expect_status={JobStatus.running, JobStatus.queued},
        expect_attempt=1,
        expect_worker="w1",
    )
    assert done is not None and done.status == JobStatus.done


async def test_expect_worker_does_not_match_a_job_without_worker(
    store: JobStore, clock: FakeClock
) -> None:
    job, _ = await store.create(make_job(clock))
    assert await store.update(job.id, {"priority": 1}, expect_worker="w1") is None


async def test_only_one_of_concurrent_transitions_wins(
    store: JobStore, clock: FakeClock
) -> None:
    job, _ = await store.create(make_job(clock))
    results = await asyncio.gather(
        *[
            store.update(
                job.id,
                {"status": JobStatus.running, "worker_id": f"w{i}"},
                expect_status={JobStatus.queued},
            )
            for i in range(10)
        ]
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    stored = await store.get(job.id)
    assert stored is not None and stored.worker_id == winners[0].worker_id


async def test_append_error_appends_in_order(store: JobStore, clock: FakeClock) -> None:
    job, _ = await store.create(make_job(clock))
    for attempt in (1, 2):
        error = ErrorInfo(
            code=ErrorCode.execution_error, message=f"boom {attempt}", attempt=attempt
        )
        updated = await store.update(
            job.id, {"error": error, APPEND_ERROR: error, "attempt": attempt + 1}
        )
        assert updated is not None
    assert updated is not None
    assert [e.message for e in updated.errors] == ["boom 1", "boom 2"]
    assert updated.error is not None and updated.error.message == "boom 2"
    assert updated.attempt == 3


async def test_update_unknown_job_is_none_and_unknown_field_raises(
    store: JobStore, clock: FakeClock
) -> None:
    assert await store.update("nope", {"priority": 5}) is None
    job, _ = await store.create(make_job(clock))
    with pytest.raises(ValueError, match="not a job field"):
        await store.update(job.id, {"colour": "red"})


async def test_list_pages_newest_first_exactly_once(
    store: JobStore, clock: FakeClock
) -> None:
    ids = []
    for _ in range(7):
        job, _ = await store.create(make_job(clock))
        ids.append(job.id)
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.list(limit=3, cursor=cursor)
        seen += [j.id for j in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == list(reversed(ids))


async def test_list_filters_by_status_and_task(
    store: JobStore, clock: FakeClock
) -> None:
    a, _ = await store.create(make_job(clock, task="a"))
    b, _ = await store.create(make_job(clock, task="b"))
    c, _ = await store.create(make_job(clock, task="a"))
    await store.update(c.id, {"status": JobStatus.done})
    assert [j.id for j in (await store.list(task="a")).items] == [c.id, a.id]
    queued = await store.list(status=JobStatus.queued)
    assert [j.id for j in queued.items] == [b.id, a.id]
    both = await store.list(status=JobStatus.done, task="a")
    assert [j.id for j in both.items] == [c.id]
    assert (await store.list(status=JobStatus.done, task="b")).items == []
    page = await store.list(status=JobStatus.queued, limit=1)
    assert [j.id for j in page.items] == [b.id] and page.next_cursor is not None
    rest = await store.list(status=JobStatus.queued, limit=1, cursor=page.next_cursor)
    assert [j.id for j in rest.items] == [a.id] and rest.next_cursor is None


async def test_list_rejects_a_foreign_cursor(store: JobStore) -> None:
    with pytest.raises(ValueError, match="cursor"):
        await store.list(cursor="not-a-cursor")


async def test_find_expired_sees_only_running_jobs_past_their_lease(
    store: JobStore, clock: FakeClock
) -> None:
    jobs = [(await store.create(make_job(clock)))[0] for _ in range(3)]
    soon = clock.now() + timedelta(seconds=10)
    for job in jobs[:2]:
        await store.update(
            job.id,
            {"status": JobStatus.running, "lease_expires_at": soon, "worker_id": "w"},
        )
    assert await store.find_expired(clock.now()) == []
    clock.advance(11)
    # The second job renews its lease; the first does not.
    await store.update(
        jobs[1].id, {"lease_expires_at": clock.now() + timedelta(seconds=10)}
    )
    expired = await store.find_expired(clock.now())
    assert [j.id for j in expired] == [jobs[0].id]
    await store.update(
        jobs[0].id, {"status": JobStatus.queued, "lease_expires_at": None}
    )
    assert await store.find_expired(clock.now()) == []


async def test_find_queued_oldest_first_and_by_update_time(
    store: JobStore, clock: FakeClock
) -> None:
    a, _ = await store.create(make_job(clock))
    clock.advance(1)
    b, _ = await store.create(make_job(clock))
    clock.advance(1)
    c, _ = await store.create(make_job(clock))
    await store.update(c.id, {"status": JobStatus.running})
    assert [j.id for j in await store.find_queued()] == [a.id, b.id]
    clock.advance(10)
    await store.update(a.id, {"priority": 60})
    stale = await store.find_queued(updated_before=clock.now() - timedelta(seconds=5))
    assert [j.id for j in stale] == [b.id]
    assert len(await store.find_queued(limit=1)) == 1


async def test_count_by_status_counts_every_status(
    store: JobStore, clock: FakeClock
) -> None:
    for _ in range(3):
        await store.create(make_job(clock))
    job, _ = await store.create(make_job(clock))
    await store.update(job.id, {"status": JobStatus.failed})
    counts = await store.count_by_status()
    assert counts == {
        JobStatus.queued: 3,
        JobStatus.running: 0,
        JobStatus.done: 0,
        JobStatus.failed: 1,
        JobStatus.canceled: 0,
    }


async def test_assets_round_trip_as_json(store: JobStore, clock: FakeClock) -> None:
    job, _ = await store.create(make_job(clock))
    assets = Assets(custom={"out": {"href": "/x.json", "rows": 3, "ok": True}})
    updated = await store.update(job.id, {"assets": assets})
    assert updated is not None and updated.assets == assets
    assert (await store.get(job.id)) == updated


async def test_ping_answers(store: JobStore) -> None:
    await store.ping()


async def test_text_json_cannot_spell_round_trips(
    store: JobStore, clock: FakeClock
) -> None:
    # An exception message can hold a lone surrogate (bytes decoded with
    # surrogateescape); the job must still be stored, read and listed intact.
    error = ErrorInfo(code=ErrorCode.execution_error, message="bad byte \udcff")
    job = make_job(clock, params={"name": "caf\u00e9 \u2603 \U0001f600"})
    await store.create(job)
    updated = await store.update(
        job.id, {"status": JobStatus.failed, "error": error, APPEND_ERROR: error}
    )
    assert updated is not None
    assert updated.error == error and updated.errors == [error]
    again = await store.get(job.id)
    assert again == updated
    page = await store.list(status=JobStatus.failed)
    assert [j.error for j in page.items] == [error]


async def test_get_many_keeps_order_and_gives_none_for_unknown(
    store: JobStore, clock: FakeClock
) -> None:
    a, _ = await store.create(make_job(clock))
    b, _ = await store.create(make_job(clock, task="other"))
    assert await store.get_many([b.id, "nope", a.id]) == [b, None, a]
    assert await store.get_many([]) == []


async def test_update_many_is_each_update_on_its_own(
    store: JobStore, clock: FakeClock
) -> None:
    jobs = [(await store.create(make_job(clock)))[0] for _ in range(4)]
    await store.update(jobs[1].id, {"status": JobStatus.running, "worker_id": "w1"})
    running = {"status": JobStatus.running, "worker_id": "w2"}
    clock.advance(1)
    results = await store.update_many(
        [
            Update(jobs[0].id, running, expect_status={JobStatus.queued}),
            Update(jobs[1].id, running, expect_status={JobStatus.queued}),
            Update(jobs[2].id, running, expect_attempt=2),
            Update(jobs[3].id, running, expect_worker="w9"),
            Update("nope", running),
            Update(jobs[3].id, {"priority": 7}, expect_status=()),
            Update(jobs[3].id, {"priority": 3}, expect_cancel_requested=False),
        ]
    )
    first, second, third, fourth, unknown, empty, last = results
    assert first is not None and first.status == JobStatus.running
    assert first.worker_id == "w2" and first.updated_at == clock.now()
    assert second is None and third is None and fourth is None
    assert unknown is None and empty is None
    assert last is not None and last.priority == 3
    stored = await store.get_many([j.id for j in jobs])
    assert [j.worker_id if j else None for j in stored] == ["w2", "w1", None, None]
    assert await store.update_many([]) == []


async def test_only_one_of_concurrent_batched_transitions_wins(
    store: JobStore, clock: FakeClock
) -> None:
    job, _ = await store.create(make_job(clock))
    batches = await asyncio.gather(
        *[
            store.update_many(
                [
                    Update(
                        job.id,
                        {"status": JobStatus.running, "worker_id": f"w{i}"},
                        expect_status={JobStatus.queued},
                    )
                ]
            )
            for i in range(10)
        ]
    )
    winners = [r for batch in batches for r in batch if r is not None]
    assert len(winners) == 1
    stored = await store.get(job.id)
    assert stored is not None and stored.worker_id == winners[0].worker_id


async def test_update_many_rejects_an_unknown_field(
    store: JobStore, clock: FakeClock
) -> None:
    job, _ = await store.create(make_job(clock))
    with pytest.raises(ValueError, match="not a job field"):
        await store.update_many([Update(job.id, {"colour": "red"})])


async def test_apply_says_whether_the_compare_and_set_landed(
    store: JobStore, clock: FakeClock
) -> None:
    job, _ = await store.create(make_job(clock))
    start = Update(
        job.id,
        {"status": JobStatus.running, "worker_id": "w1"},
        expect_status={JobStatus.queued},
        expect_attempt=1,
    )
    assert await store.apply(start) is True
    # The same start again misses: the job is no longer queued.
    assert await store.apply(start) is False
    finish = Update(
        job.id,
        {"status": JobStatus.done, "progress": Progress(percent=100)},
        expect_status={JobStatus.running},
        expect_worker="w2",
    )
    assert await store.apply(finish) is False
    assert await store.apply(Update("no-such-job", {"priority": 1})) is False
    stored = await store.get(job.id)
    assert stored is not None
    assert (stored.status, stored.worker_id) == (JobStatus.running, "w1")
    assert await store.apply(
        Update(job.id, finish.fields, expect_worker="w1", expect_attempt=1)
    )
    stored = await store.get(job.id)
    assert stored is not None and stored.status == JobStatus.done
    assert stored.progress.percent == 100
