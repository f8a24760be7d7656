"""What crosses the pipe between a worker and its child processes: JSON only.

Nothing is pickled. A runner reaches the child as the import path of its class
plus JSON (its attributes, or the keyword arguments to build it with); params,
progress, assets, outputs and errors travel as JSON messages.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import traceback
from dataclasses import dataclass
from typing import Any

from backgrounder._json import check_json, dumps
from backgrounder.errors import (
    ConfigurationError,
    InvalidParamsError,
    NonRetryableError,
)

__all__ = ["RunnerRef", "decode", "describe_exception", "encode", "import_object"]

_MAX_DEPTH = 64


def encode(message: dict[str, Any]) -> bytes:
    """Encode one message as JSON bytes."""
    return dumps(message).encode()


def decode(data: bytes) -> dict[str, Any]:
    """Decode one message; raise ValueError unless it is a JSON object."""
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError(f"a message must be a JSON object (got {message!r:.60})")
    return message


def import_object(module: str, qualname: str) -> Any:
    """Import ``module`` and walk ``qualname`` in it."""
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def path_of(obj: type[Any], *, what: str) -> str:
    """Return ``module:qualname`` for a class the child can import.

    Raises:
        ConfigurationError: The class is local to a function, or importing the
            path does not give the same class back.
    """
    module, qualname = obj.__module__, obj.__qualname__
    remedy = (
        "define it at module level in an importable module (a script's own "
        "classes work when the script guards its start-up code with "
        "'if __name__ == \"__main__\":')"
    )
    if "<locals>" in qualname:
        raise ConfigurationError(
            f"{what} {qualname!r} is defined inside a function, so a child process "
            f"cannot import it; {remedy}"
        )
    main = sys.modules.get("__main__")
    if module == "__main__" and not (
        getattr(main, "__file__", None) or getattr(main, "__spec__", None)
    ):
        raise ConfigurationError(
            f"{what} {qualname!r} is defined in an interactive session, so a child "
            f"process cannot import it; {remedy}"
        )
    try:
        found = import_object(module, qualname)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(
            f"{what} {module}:{qualname} cannot be imported ({exc}); {remedy}"
        ) from exc
    if found is not obj:
        raise ConfigurationError(
            f"{what} {module}:{qualname} imports as a different object; {remedy}"
        )
    return f"{module}:{qualname}"


@dataclass(frozen=True)
class RunnerRef:
    """How a child process rebuilds a runner without unpickling anything.

    With ``init_kwargs`` the child calls ``cls(**init_kwargs)``. Without, it
    makes an instance without calling ``__init__`` and gives it the parent
    instance's attributes, copied as JSON: configuration belongs in plain
    attributes, heavy objects (models, clients) in ``setup()``.
    """

    path: str
    state: dict[str, Any] | None = None
    init_kwargs: dict[str, Any] | None = None

    @classmethod
    def of(cls, runner: Any, init_kwargs: dict[str, Any] | None = None) -> RunnerRef:
        """Describe ``runner`` (an instance, or a class with ``init_kwargs``).

        Raises:
            ConfigurationError: The class cannot be imported in a child, an
                attribute or keyword argument is not JSON, or the keyword
                arguments do not fit the constructor.
        """
        klass = runner if isinstance(runner, type) else type(runner)
        name = klass.__qualname__
        path = path_of(klass, what="runner class")
        if isinstance(runner, type) and init_kwargs is None:
            init_kwargs = {}
        if init_kwargs is not None:
            _check_json(init_kwargs, f"init_kwargs of {name}", "init_kwargs")
            try:
                inspect.signature(klass).bind(**init_kwargs)
            except TypeError as exc:
                raise ConfigurationError(
                    f"runner {name} cannot be built with init_kwargs "
                    f"{sorted(init_kwargs)!r}: {exc}"
                ) from exc
            return cls(path=path, init_kwargs=dict(init_kwargs))
        try:
            state = dict(vars(runner))
        except TypeError:
            raise ConfigurationError(
                f"runner {name} has no __dict__ (it uses __slots__); pass "
                "init_kwargs= so the child process can build it"
            ) from None
        _check_json(state, f"the attributes of {name}", "runner")
        return cls(path=path, state=state)

    def to_json(self) -> dict[str, Any]:
        """Return the reference as a JSON object."""
        return {"path": self.path, "state": self.state, "init_kwargs": self.init_kwargs}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunnerRef:
        """Read a reference written by ``to_json``."""
        return cls(
            path=data["path"], state=data.get("state"), init_kwargs=data["init_kwargs"]
        )

    def build(self) -> Any:
        """Import the class and make the runner (in the child process)."""
        module, _, qualname = self.path.partition(":")
        klass = import_object(module, qualname)
        if self.init_kwargs is not None:
            return klass(**self.init_kwargs)
        runner = klass.__new__(klass)
        runner.__dict__.update(self.state or {})
        return runner


def _check_json(value: dict[str, Any], what: str, path: str) -> None:
    try:
        check_json(value, path=path, max_depth=_MAX_DEPTH)
    except InvalidParamsError as exc:
        raise ConfigurationError(
            f"{what} must be JSON for a child process to get them: {exc}. Create "
            "such objects in setup(), which runs in the child, or pass "
            "init_kwargs= with JSON values"
        ) from exc


def describe_exception(
    exc: BaseException, non_retryable: tuple[type[BaseException], ...]
) -> dict[str, Any]:
    """Describe an exception raised in the child, as JSON for the worker."""
    kind = type(exc)
    try:
        message = str(exc)
    except Exception:
        message = f"<{kind.__name__}: its message could not be read>"
    return {
        "type": kind.__name__,
        "qualname": f"{kind.__module__}.{kind.__qualname__}",
        "message": message[:4000],
        "traceback": "".join(traceback.format_exception(exc))[-20000:],
        "retryable": not isinstance(exc, (NonRetryableError, *non_retryable)),
    }
