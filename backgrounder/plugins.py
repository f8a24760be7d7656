"""The plugin manager: built-in backends, entry-point plugins, and hook calls."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from typing import Any

import pluggy

from backgrounder import hookspecs
from backgrounder.errors import PluginError

__all__ = ["ENTRY_POINT_GROUP", "call_hook", "create_plugin_manager"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "backgrounder"


def _builtin_plugins() -> list[object]:
    from backgrounder.queue import memory
    from backgrounder.resources import nvml, probes
    from backgrounder.store import sqlite

    return [sqlite, memory, probes, nvml]


def create_plugin_manager(
    plugins: Iterable[object] | None = None, *, load_entry_points: bool = True
) -> pluggy.PluginManager:
    """Return a plugin manager with the built-ins, entry points and ``plugins``.

    Args:
        plugins: Extra plugin objects (modules or instances with hookimpls).
        load_entry_points: Load installed plugins of the ``backgrounder`` group.

    Raises:
        PluginError: A plugin implements a hook that does not exist.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for plugin in _builtin_plugins():
        pm.register(plugin)
    if load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in plugins or ():
        if not pm.is_registered(plugin):
            pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc}; check the hook's name and spelling") from exc
    return pm


async def call_hook(pm: pluggy.PluginManager, name: str, **kwargs: Any) -> Any:
    """Call hook ``name`` with keyword arguments and await awaitable results.

    For ``firstresult`` hooks the first non-None result is returned (awaited);
    for the others a list of results, each awaited.
    """
    caller = getattr(pm.hook, name)
    result = caller(**kwargs)
    if isinstance(result, list):
        return [await r if inspect.isawaitable(r) else r for r in result]
    if inspect.isawaitable(result):
        return await result
    return result


async def notify(pm: pluggy.PluginManager, name: str, **kwargs: Any) -> None:
    """Call a broadcast hook; an implementation that raises is logged and skipped."""
    caller = getattr(pm.hook, name)
    for impl in reversed(caller.get_hookimpls()):
        try:
            result = impl.function(
                *[kwargs[arg] for arg in impl.argnames if arg in kwargs]
            )
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception(
                "plugin %r raised in hook %s; the event went on to the other plugins",
                impl.plugin_name,
                name,
                extra={"event": "plugin.error", "plugin": impl.plugin_name},
            )
