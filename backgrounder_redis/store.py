"""RedisStore: every job as a JSON-field hash on Redis, changed by Lua scripts."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from backgrounder.clock import Clock
from backgrounder.errors import StoreError
from backgrounder.models import Job, JobPage, JobStatus
from backgrounder.store.base import (
    APPEND_ERROR,
    JobStore,
    Update,
    decode_row,
    encode_field,
    read_job,
    read_jobs,
    refuse_missing_required,
    to_epoch,
)
from backgrounder_redis._common import RedisBackend

__all__ = ["RedisStore"]

logger = logging.getLogger(__name__)

_FIELDS = [name for name in Job.model_fields]
_UPDATABLE = frozenset(_FIELDS) - {"id"}
_INTS = frozenset({"priority", "attempt", "retries", "max_retries"})

# Keys, all under the prefix P (passed as ARGV[1]; the scripts build the names):
#   P:job:<id>        hash: the job's fields, encoded as encode_field does (JSON
#                     text, epoch floats); an absent field is None. Also "_seq"
#                     (submission order) and "_idem_exp" (idempotency key expiry).
#   P:seq             counter of submissions
#   P:all             zset id by seq: every job
#   P:status:<s>      zset id by seq: jobs in status s
#   P:task:<t>        zset id by seq: jobs of task t
#   P:running         zset id by lease_expires_at: running jobs
#   P:queued          zset id by updated_at: queued jobs
#   P:idem:<key>      string: the job id holding an idempotency key
# Every script that changes a job's status keeps the indexes in the same step.

_INDEX = """
local function reindex(p, id, k, old_status)
  local f = redis.call('HMGET', k, 'status', '_seq', 'lease_expires_at', 'updated_at')
  local status, seq = f[1], f[2]
  if old_status ~= status then
    if old_status then redis.call('ZREM', p .. ':status:' .. old_status, id) end
    redis.call('ZADD', p .. ':status:' .. status, seq, id)
  end
  if status == 'running' and f[3] then
    redis.call('ZADD', p .. ':running', f[3], id)
  else
    redis.call('ZREM', p .. ':running', id)
  end
  if status == 'queued' then
    redis.call('ZADD', p .. ':queued', f[4], id)
  else
    redis.call('ZREM', p .. ':queued', id)
  end
end
"""

# ARGV: prefix, id, now, idempotency key or '', expiry or '', ttl ms or '',
# then field, value pairs. Returns {2} for a job inserted now (the caller has its
# fields), {1, hash} when the id is already stored, {0, hash} for the live job
# that holds the idempotency key.
_CREATE = (
    _INDEX
    + """
local p, id, now, key, exp, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4],
  ARGV[5], ARGV[6]
local k = p .. ':job:' .. id
if redis.call('EXISTS', k) == 1 then
  return {1, redis.call('HGETALL', k)}
end
if key ~= '' then
  local ik = p .. ':idem:' .. key
  local holder = redis.call('GET', ik)
  if holder then
    local hk = p .. ':job:' .. holder
    local hexp = redis.call('HGET', hk, '_idem_exp')
    if redis.call('EXISTS', hk) == 1 and (not hexp or tonumber(hexp) >= now) then
      return {0, redis.call('HGETALL', hk)}
    end
    redis.call('HDEL', hk, 'idempotency_key', '_idem_exp')
    redis.call('DEL', ik)
  end
  if ttl ~= '' then
    redis.call('SET', ik, id, 'PX', ttl)
  else
    redis.call('SET', ik, id)
  end
end
local seq = redis.call('INCR', p .. ':seq')
redis.call('HSET', k, '_seq', seq, unpack(ARGV, 7))
if exp ~= '' then redis.call('HSET', k, '_idem_exp', exp) end
redis.call('ZADD', p .. ':all', seq, id)
redis.call('ZADD', p .. ':task:' .. redis.call('HGET', k, 'task'), seq, id)
reindex(p, id, k, false)
return {2}
"""
)

# ARGV: prefix, id, now, expected statuses ("," joined, '' for any), expected
# attempt or '', expected worker or '' (with ARGV[7] = '1' when it is checked),
# expected cancel_requested ('0', '1' or '' for any), then op, field, value
# triples: op 's' sets, 'd' deletes, 'a' appends a JSON
# value to the JSON list in field. _UPDATE returns the job after the write,
# _APPLY only 1 (both return nil on a miss).
_CAS = (
    _INDEX
    + """
local p, id, now = ARGV[1], ARGV[2], ARGV[3]
local k = p .. ':job:' .. id
local cur = redis.call('HMGET', k, 'status', 'attempt', 'worker_id')
if not cur[1] then return false end
if ARGV[4] ~= '' then
  local ok = false
  for s in string.gmatch(ARGV[4], '[^,]+') do
    if s == cur[1] then ok = true end
  end
  if not ok then return false end
end
if ARGV[5] ~= '' and tonumber(ARGV[5]) ~= tonumber(cur[2]) then return false end
if ARGV[7] == '1' and ARGV[6] ~= cur[3] then return false end
if ARGV[8] ~= '' then
  local cancel = redis.call('HGET', k, 'cancel_requested') or '0'
  if cancel ~= ARGV[8] then return false end
end
local sets, dels, touched = {}, {}, false
for i = 9, #ARGV, 3 do
  local op, name, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == 's' then
    sets[#sets + 1] = name
    sets[#sets + 1] = value
  elseif op == 'd' then
    dels[#dels + 1] = name
  else
    local list = redis.call('HGET', k, name) or '[]'
    if list == '[]' then
      list = '[' .. value .. ']'
    else
      list = string.sub(list, 1, -2) .. ',' .. value .. ']'
    end
    sets[#sets + 1] = name
    sets[#sets + 1] = list
  end
  if name == 'updated_at' then touched = true end
end
if not touched then
  sets[#sets + 1] = 'updated_at'
  sets[#sets + 1] = now
end
-- One HDEL, then one HSET, for all the fields. A field both deleted and
-- appended to ends with the append (made from the stored list), and of two
-- values set for one field the last wins: as one SQL UPDATE does.
if #dels > 0 then redis.call('HDEL', k, unpack(dels)) end
if #sets > 0 then redis.call('HSET', k, unpack(sets)) end
reindex(p, id, k, cur[1])
"""
)
_UPDATE = _CAS + "return redis.call('HGETALL', k)\n"
_APPLY = _CAS + "return 1\n"


def _text(value: Any) -> str:
    """Return the Redis text of an encoded field value."""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _decode(flat: Any) -> Job:
    """Build a Job from a hash as HGETALL returns it (a dict or a flat list).

    Field by field: a hash holds text, so each number and each JSON value is
    read on its own, and anything that is not one is an error, never part of
    another field.
    """
    if isinstance(flat, dict):
        row: dict[str, Any] = dict(flat)
    else:
        row = dict(zip(flat[::2], flat[1::2], strict=True))
    for name in _INTS:
        if name in row:
            row[name] = int(row[name])
    if "timeout_seconds" in row:
        row["timeout_seconds"] = float(row["timeout_seconds"])
    return decode_row(row)


class RedisStore(RedisBackend, JobStore):
    """Jobs on Redis, so that API servers and workers on many hosts share them.

    Each job is a hash of JSON text and epoch floats (the same encoding as the
    SQLite store). Creates and updates are Lua scripts: an update is an atomic
    compare-and-set on status, attempt and worker, and keeps the status, task,
    lease and queued indexes in the same step. Times come from the injected clock.
    """

    name = "redis"

    kind = "store"
    error_type = StoreError
    script_bodies = {"create": _CREATE, "update": _UPDATE, "apply": _APPLY}

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _read(self, flat: Any, job_id: str) -> Job:
        """Decode one hash; CorruptJobError if it cannot be read."""
        return read_job(_decode, flat, job_id, f"Redis store {self.prefix!r}")

    async def open(self, clock: Clock) -> None:
        """Connect and check the server accepts writes."""
        await self._connect(clock)
        await self.ping()

    async def ping(self) -> None:
        """Write a short-lived key, so a read-only replica shows up too."""
        async with self._errors("ping"):
            await self.client.set(f"{self.prefix}:ping", "1", px=10_000)

    async def create(
        self, job: Job, *, idempotency_expires_at: datetime | None = None
    ) -> tuple[Job, bool]:
        """Insert the job, or return the live job that holds its idempotency key."""
        now = self._clock.now()
        args: list[Any] = [self.prefix, job.id, repr(to_epoch(now)), "", "", ""]
        if job.idempotency_key is not None:
            args[3] = job.idempotency_key
            if idempotency_expires_at is not None:
                args[4] = repr(to_epoch(idempotency_expires_at))
                # The key's TTL is relative to the injected clock; the script also
                # compares the expiry itself, so a FakeClock moves it as well.
                ttl = (idempotency_expires_at - now).total_seconds()
                args[5] = str(max(1, int(ttl * 1000)))
        for name in _FIELDS:
            value = encode_field(name, getattr(job, name))
            if value is not None:
                args += [name, _text(value)]
        reply = await self._script("create", (), args)
        if reply[0] == 2:
            # Inserted just now from these very fields: the stored hash decodes
            # to this job (epoch floats round-trip to the microsecond).
            return job, True
        created, flat = reply
        return self._read(flat, job.id), bool(created)

    async def get(self, job_id: str) -> Job | None:
        """Return the job, or None."""
        flat = await self._call("get", "HGETALL", self._key(job_id))
        return self._read(flat, job_id) if flat else None

    async def get_many(self, job_ids: Sequence[str]) -> builtins.list[Job | None]:
        """Return the jobs (None for an unknown id) in order, in one round trip."""
        if not job_ids:
            return []
        rows = await self._call_many(
            "get", [("HGETALL", self._key(job_id)) for job_id in job_ids]
        )
        stored = [
            (job_id, row) for job_id, row in zip(job_ids, rows, strict=True) if row
        ]
        read = iter(read_jobs(_decode, stored, f"Redis store {self.prefix!r}"))
        return [next(read) if row else None for row in rows]

    async def _get_many(self, ids: builtins.list[str]) -> builtins.list[Job]:
        return [job for job in await self.get_many(ids) if job is not None]

    async def list(
        self,
        *,
        status: JobStatus | None = None,
        task: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobPage:
        """Return a page of jobs, newest first by submission sequence."""
        if cursor is not None:
            try:
                before = int(cursor)
            except ValueError:
                raise ValueError(
                    f"cursor {cursor!r} is not valid; pass the next_cursor of a page"
                ) from None
            top: str = f"({before}"
        else:
            top = "+inf"
        if task is not None:
            index = f"{self.prefix}:task:{task}"
        elif status is not None:
            index = f"{self.prefix}:status:{status}"
        else:
            index = f"{self.prefix}:all"
        found: builtins.list[tuple[Job, int]] = []
        batch = max(limit + 1, 50)
        while len(found) <= limit:
            async with self._errors("list"):
                pairs: Any = await self.client.zrevrangebyscore(
                    index, top, "-inf", start=0, num=batch, withscores=True
                )
            if not pairs:
                break
            jobs = await self._get_many([str(job_id) for job_id, _ in pairs])
            by_id = {j.id: j for j in jobs}
            for job_id, seq in pairs:
                job = by_id.get(str(job_id))
                if job is None or (status is not None and job.status != status):
                    continue
                found.append((job, int(seq)))
            top = f"({int(pairs[-1][1])}"
            if len(pairs) < batch:
                break
        items = [job for job, _ in found[:limit]]
        next_cursor = str(found[limit - 1][1]) if len(found) > limit else None
        return JobPage(items=items, next_cursor=next_cursor)

    async def update(
        self, job_id: str, fields: Mapping[str, Any], **expect: Any
    ) -> Job | None:
        """Compare-and-set the named fields in one Lua script.

        ``expect`` takes the conditions ``JobStore.update`` documents.
        """
        args = self._update_args(Update(job_id, fields, **expect))
        if args is None:
            return None
        flat = await self._script("update", (), args)
        return self._read(flat, job_id) if flat else None

    async def update_many(self, updates: Sequence[Update]) -> builtins.list[Job | None]:
        """Run each compare-and-set as its own script, all in one round trip.

        Each one is exactly ``update``: atomic on its own, missing on its own.
        """
        argv = [self._update_args(u) for u in updates]
        commands = [
            self._script_args("update", (), args) for args in argv if args is not None
        ]
        replies = iter(await self._call_many("update", commands) if commands else [])
        results: builtins.list[Job | None] = []
        for u, args in zip(updates, argv, strict=True):
            flat = next(replies) if args is not None else None
            results.append(self._read(flat, u.job_id) if flat else None)
        return results

    async def apply(self, update: Update) -> bool:
        """Compare-and-set as ``update`` does, without reading the job back."""
        args = self._update_args(update)
        if args is None:
            return False
        return bool(await self._script("apply", (), args))

    def _update_args(self, u: Update) -> builtins.list[Any] | None:
        """Return the update script's ARGV, or None when it cannot match."""
        refuse_missing_required(u.fields)
        args: builtins.list[Any] = [
            self.prefix,
            u.job_id,
            repr(to_epoch(self._clock.now())),
            "",
            "" if u.expect_attempt is None else str(u.expect_attempt),
            u.expect_worker or "",
            "0" if u.expect_worker is None else "1",
            ""
            if u.expect_cancel_requested is None
            else str(int(u.expect_cancel_requested)),
        ]
        if u.expect_status is not None:
            statuses = [str(s) for s in u.expect_status]
            if not statuses:
                return None
            args[3] = ",".join(statuses)
        for name, value in u.fields.items():
            if name == APPEND_ERROR:
                args += ["a", "errors", encode_field(name, value)]
                continue
            if name not in _UPDATABLE:
                raise ValueError(f"{name!r} is not a job field that can be updated")
            encoded = encode_field(name, value)
            if encoded is None:
                args += ["d", name, ""]
            else:
                args += ["s", name, _text(encoded)]
        return args

    async def find_expired(
        self, now: datetime, *, limit: int = 100
    ) -> builtins.list[Job]:
        """Return running jobs whose lease ran out before ``now``."""
        async with self._errors("find_expired"):
            ids = await self.client.zrangebyscore(
                f"{self.prefix}:running",
                "-inf",
                f"({to_epoch(now)!r}",
                start=0,
                num=limit,
            )
        jobs = await self._get_many([str(i) for i in ids])
        return [j for j in jobs if j.status == JobStatus.running]

    async def find_queued(
        self, *, updated_before: datetime | None = None, limit: int = 1000
    ) -> builtins.list[Job]:
        """Return queued jobs, oldest first."""
        async with self._errors("find_queued"):
            if updated_before is None:
                ids = await self.client.zrange(
                    f"{self.prefix}:status:queued", 0, limit - 1
                )
            else:
                ids = await self.client.zrangebyscore(
                    f"{self.prefix}:queued",
                    "-inf",
                    f"({to_epoch(updated_before)!r}",
                    start=0,
                    num=limit,
                )
        jobs = await self._get_many([str(i) for i in ids])
        return [j for j in jobs if j.status == JobStatus.queued]

    async def count_by_status(self) -> dict[JobStatus, int]:
        """Return counts per status (every status present, zero included)."""
        statuses = list(JobStatus)
        counts = await self._call_many(
            "count", [("ZCARD", f"{self.prefix}:status:{s}") for s in statuses]
        )
        return {s: int(c) for s, c in zip(statuses, counts, strict=True)}
