"""Drive an ASGI app's lifespan (startup, then shutdown) without a server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["LifespanError", "lifespan"]

Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[Message]],
        Callable[[Message], Awaitable[None]],
    ],
    Awaitable[None],
]


class LifespanError(RuntimeError):
    """Raised when an app's lifespan startup or shutdown fails."""


@contextlib.asynccontextmanager
async def lifespan(
    app: ASGIApp, *, on_shutdown: Callable[[], Awaitable[None]] | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Run the app's startup on enter and its shutdown on exit; yield its state.

    ``on_shutdown`` runs beside the shutdown until it completes (the plugin uses
    it to move a FakeClock so shutdown graces elapse).

    Raises:
        LifespanError: The app reported a failed startup or shutdown, or its
            lifespan ended without answering.
    """
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    state: dict[str, Any] = {}
    scope = {
        "type": "lifespan",
        "asgi": {"version": "3.0", "spec_version": "2.0"},
        "state": state,
    }

    async def run() -> None:
        try:
            await app(scope, inbox.get, outbox.put)
        finally:
            await outbox.put({"type": "lifespan.ended"})

    task = asyncio.create_task(run(), name="backgrounder-test-lifespan")
    try:
        await inbox.put({"type": "lifespan.startup"})
        await _expect(outbox, task, "startup")
        yield state
        await inbox.put({"type": "lifespan.shutdown"})
        pump = asyncio.ensure_future(on_shutdown()) if on_shutdown is not None else None
        try:
            await _expect(outbox, task, "shutdown")
        finally:
            if pump is not None:
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _expect(
    outbox: asyncio.Queue[Message], task: asyncio.Task[None], phase: str
) -> None:
    message = await outbox.get()
    kind = message["type"]
    if kind == f"lifespan.{phase}.complete":
        return
    if kind == f"lifespan.{phase}.failed":
        raise LifespanError(f"the app's {phase} failed: {message.get('message', '')}")
    error = task.exception() if task.done() and not task.cancelled() else None
    raise LifespanError(
        f"the app's lifespan ended during {phase} without answering"
        + (f": {error!r}" if error else "")
    ) from error
