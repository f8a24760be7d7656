"""The worker's side of its child processes: start them, talk to them, stop them.

Every child is started with multiprocessing's *spawn* method, never fork: a
forked copy of a process that has touched CUDA (or holds threads and locks)
is not safe to use. The spawn machinery carries only the child's end of a pipe
and a JSON string; every later message is JSON over that pipe.

One reader thread per child receives its messages and hands them to the event
loop, and it alone reaps the process: when the pipe closes or the process ends,
it collects the exit code and posts a final ``{"op": "exit"}`` message. So
"the child is gone" is one event, and a waiting job reads it in order after
everything the child said before dying.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.util  # its exit handler must be registered before ours
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_ready
from multiprocessing.process import BaseProcess
from typing import Any

from backgrounder._json import dumps
from backgrounder.isolation._child import child_main
from backgrounder.isolation._wire import decode, encode
from backgrounder.isolation.errors import (
    ChildProcessLostError,
    ProcessIsolationError,
    remote_error,
)

__all__ = ["ChildPool", "ChildProcess"]

logger = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")

#: How often a reader thread checks that its child still lives, for when a
#: grandchild inherited the pipe and keeps it open after the child died.
_POLL_SECONDS = 1.0

#: Messages longer than this are sent from a thread: the pipe may not take them
#: at once, and the event loop must not wait for the child to read.
_LARGE_MESSAGE_BYTES = 32 * 1024

GpuKey = tuple[int, ...]


class ChildProcess:
    """One child process as the worker sees it: its pipe, its messages, its end."""

    def __init__(
        self,
        process: BaseProcess,
        conn: Connection,
        key: GpuKey,
        on_exit: Callable[[ChildProcess], None],
    ) -> None:
        """Wrap a started process and start its reader thread."""
        assert process.pid is not None
        self.process = process
        self.pid: int = process.pid
        self.key = key
        self.jobs_run = 0
        self.seq = 0
        self.exitcode: int | None = None
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._exited = asyncio.Event()
        self._conn = conn
        self._loop = asyncio.get_running_loop()
        self._on_exit = on_exit
        self._reader = threading.Thread(
            target=self._read, name=f"backgrounder-child-{self.pid}", daemon=True
        )
        self._reader.start()

    def __repr__(self) -> str:
        state = f"exited {self.exitcode}" if self.exited else "alive"
        return f"ChildProcess(pid={self.pid}, gpus={list(self.key)}, {state})"

    @property
    def exited(self) -> bool:
        """True once the process is gone and reaped."""
        return self._exited.is_set()

    # ------------------------------------------------------------ talking

    def send(self, message: dict[str, Any]) -> bool:
        """Send a small message; return False if the child is gone."""
        return self._send_bytes(encode(message))

    async def send_async(self, message: dict[str, Any]) -> bool:
        """Send a message of any size without blocking the event loop."""
        data = encode(message)
        if len(data) <= _LARGE_MESSAGE_BYTES:
            return self._send_bytes(data)
        return await asyncio.to_thread(self._send_bytes, data)

    def _send_bytes(self, data: bytes) -> bool:
        try:
            self._conn.send_bytes(data)
        except (OSError, ValueError):
            return False
        return True

    # ------------------------------------------------------------ ending

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM): it unwinds the job and tears down."""
        self.process.terminate()

    def kill(self) -> None:
        """Stop the process for good (SIGKILL)."""
        self.process.kill()

    async def wait_exit(self, seconds: float | None) -> bool:
        """Wait until the process is gone; return False if ``seconds`` passed first.

        Real seconds, not the job clock: they bound a real process.
        """
        if seconds is None:
            await self._exited.wait()
            return True
        try:
            async with asyncio.timeout(seconds):
                await self._exited.wait()
        except TimeoutError:
            return False
        return True

    def join_reader(self, timeout: float | None) -> bool:
        """Block until the reader thread has reaped the process (no event loop)."""
        self._reader.join(timeout)
        return not self._reader.is_alive()

    # ------------------------------------------------------------ reader thread

    def _read(self) -> None:
        conn, sentinel = self._conn, self.process.sentinel
        try:
            while True:
                ready = wait_ready([conn, sentinel], timeout=_POLL_SECONDS)
                if conn in ready:
                    if not self._receive():
                        break
                elif sentinel in ready or self.process.exitcode is not None:
                    while self._receive(drain=True):
                        pass
                    break
        finally:
            code = self._reap()
            with contextlib.suppress(OSError):
                conn.close()
            self._post(self._exit, code)

    def _receive(self, *, drain: bool = False) -> bool:
        """Receive one message; return False at the end of the pipe."""
        try:
            if drain and not self._conn.poll(0):
                return False
            data = self._conn.recv_bytes()
        except (EOFError, OSError):
            return False
        try:
            message = decode(data)
        except ValueError:
            logger.warning("child process %d sent a message that is not JSON", self.pid)
            return True
        self._post(self.messages.put_nowait, message)
        return True

    def _reap(self) -> int | None:
        self.process.join()
        # Another thread's poll may have reaped it an instant before us; its
        # exit code lands on the process object just after.
        deadline = time.monotonic() + 1.0
        while self.process.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.process.exitcode

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(callback, *args)

    def _exit(self, code: int | None) -> None:
        self.exitcode = code
        self._exited.set()
        self.messages.put_nowait({"op": "exit", "code": code})
        self._on_exit(self)


class ChildPool:
    """Warm child processes of one ProcessRunner on one event loop.

    Children start lazily, one per job running at once, and stay warm between
    jobs. A child serves jobs whose GPU set matches the one it started with
    (``CUDA_VISIBLE_DEVICES`` cannot change once CUDA is up). A child that was
    stopped, died or reached ``max_jobs_per_child`` leaves the pool; the next
    job that needs one starts a new child.
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        name: str,
        max_jobs_per_child: int | None,
        kill_grace_seconds: float,
    ) -> None:
        """Build an empty pool on the running event loop."""
        self.loop = asyncio.get_running_loop()
        self._config = config
        self._name = name
        self._max_jobs = max_jobs_per_child
        self._grace = kill_grace_seconds
        self._idle: list[ChildProcess] = []
        self._children: set[ChildProcess] = set()
        self._ending: set[asyncio.Task[None]] = set()
        self._closed = False
        _OPEN_POOLS.add(self)

    def pids(self) -> list[int]:
        """Return the pids of the children alive now, sorted."""
        return sorted(c.pid for c in self._children if not c.exited)

    # ------------------------------------------------------------ jobs

    async def acquire(self, key: GpuKey, job_id: str) -> ChildProcess:
        """Return an idle child for these GPUs, or start one.

        Raises:
            ChildSetupError: ``setup()`` failed in the new child.
            ChildProcessLostError: The new child died while starting.
        """
        for child in reversed(self._idle):
            if child.key == key and not child.exited:
                self._idle.remove(child)
                return child
        # A child kept warm for other GPUs makes way, so the pool never holds
        # more children than jobs ran at once.
        for child in self._idle:
            if child.key != key:
                self.end_soon(child, polite=True)
                break
        return await self.spawn(key, job_id=job_id)

    def release(self, child: ChildProcess) -> None:
        """Take back a child whose job ended with an answer; keep it warm or recycle."""
        child.jobs_run += 1
        if child.exited:
            return
        if self._closed or (self._max_jobs and child.jobs_run >= self._max_jobs):
            self.end_soon(child, polite=True)
            return
        self._idle.append(child)

    def keep(self, child: ChildProcess) -> None:
        """Add a child started ahead of jobs to the idle children."""
        if not child.exited:
            self._idle.append(child)

    async def spawn(self, key: GpuKey, *, job_id: str | None) -> ChildProcess:
        """Start a child for these GPUs and wait until its ``setup()`` is done."""
        conn, child_conn = _SPAWN.Pipe()
        process = _SPAWN.Process(
            target=child_main,
            args=(child_conn, dumps({**self._config, "gpus": list(key)})),
            name=f"backgrounder-{self._name}",
        )
        # A fork-exec of the interpreter: about a millisecond on the loop.
        process.start()
        child_conn.close()
        child = ChildProcess(process, conn, key, on_exit=self._forget)
        self._children.add(child)
        logger.debug("started child process %d for %s", child.pid, self._name)
        try:
            message = await child.messages.get()
        except BaseException:
            await self.end(child, polite=False)
            raise
        if message.get("op") == "ready":
            return child
        await self.end(child, polite=False)
        if message.get("op") == "setup_failed":
            if job_id is None:
                error = message.get("error", {})
                raise ProcessIsolationError(
                    f"setup() of {self._name} failed in child process {child.pid}: "
                    f"{error.get('type')}: {error.get('message')}"
                )
            raise remote_error(job_id, message.get("error", {}), setup=True)
        if job_id is None:
            raise ProcessIsolationError(
                f"child process {child.pid} for {self._name} ended while starting "
                f"(exit code {child.exitcode}); see its output on stderr"
            )
        raise ChildProcessLostError(
            job_id=job_id, pid=child.pid, exitcode=child.exitcode
        )

    def _forget(self, child: ChildProcess) -> None:
        self._children.discard(child)
        with contextlib.suppress(ValueError):
            self._idle.remove(child)

    # ------------------------------------------------------------ stopping

    def end_soon(self, child: ChildProcess, *, polite: bool) -> asyncio.Task[None]:
        """Stop a child in the background; the pool waits for it when closing."""
        with contextlib.suppress(ValueError):
            self._idle.remove(child)
        task = self.loop.create_task(self._end(child, polite=polite))
        self._ending.add(task)
        task.add_done_callback(self._ended)
        return task

    async def end(self, child: ChildProcess, *, polite: bool) -> None:
        """Stop a child and wait until it is gone, even if this wait is canceled."""
        await asyncio.shield(self.end_soon(child, polite=polite))

    async def _end(self, child: ChildProcess, *, polite: bool) -> None:
        """Stop ``child``: politely (teardown) or at once; SIGKILL past the grace.

        polite: ask it to stop between jobs, so ``teardown()`` runs; then SIGTERM.
        not polite (a job is running): ask it to cancel and SIGTERM at once, so
        the job's ``finally`` blocks run; then SIGKILL.
        """
        if child.exited:
            return
        if polite:
            child.send({"op": "stop"})
            if await child.wait_exit(self._grace):
                return
        else:
            child.send({"op": "cancel", "seq": child.seq})
        child.terminate()
        if await child.wait_exit(self._grace):
            return
        logger.warning(
            "child process %d of %s did not stop within %.1f s of SIGTERM; killing it",
            child.pid,
            self._name,
            self._grace,
        )
        child.kill()
        await child.wait_exit(None)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._ending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "stopping a child process of %s failed",
                self._name,
                exc_info=task.exception(),
            )

    async def close(self) -> None:
        """Stop every child (idle ones politely) and wait until all are gone."""
        self._closed = True
        _OPEN_POOLS.discard(self)
        idle = set(self._idle)
        for child in list(self._children):
            self.end_soon(child, polite=child in idle)
        while self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)

    def close_sync(self) -> None:
        """Stop every child without an event loop: at exit, or for a closed loop."""
        self._closed = True
        _OPEN_POOLS.discard(self)
        children = list(self._children)
        for child in children:
            if not child.send({"op": "stop"}):
                child.terminate()
        for child in children:
            if child.join_reader(self._grace):
                continue
            child.terminate()
            if not child.join_reader(self._grace):
                child.kill()
                child.join_reader(None)
        self._children.clear()
        self._idle.clear()


# Pools not closed yet, so children never outlive the process. A weak set: a
# pool stays in it only while something else (its runner, a child's reader
# thread) keeps it alive.
_OPEN_POOLS: weakref.WeakSet[ChildPool] = weakref.WeakSet()


def _close_open_pools() -> None:
    for pool in list(_OPEN_POOLS):
        pool.close_sync()


# Registered after multiprocessing's own handler, so it runs before it: that
# handler joins every child, which would wait forever for ours.
atexit.register(_close_open_pools)
