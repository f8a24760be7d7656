"""Checks that params and outputs are plain JSON, with the path of any offender."""

from __future__ import annotations

import json
import math
from typing import Any

from backgrounder.errors import InvalidParamsError, ParamsTooLargeError

__all__ = ["check_json", "check_params", "dumps", "json_type"]

_SCALARS = (str, int, bool, type(None))


_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def json_type(value: Any) -> str:
    """Name a decoded JSON value's type as JSON does ("an array", "null")."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def dumps(value: Any) -> str:
    """Encode JSON compactly; NaN and Infinity are refused."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def check_json(value: Any, *, path: str, max_depth: int) -> None:
    """Raise InvalidParamsError unless ``value`` is JSON that round-trips unchanged.

    Walks iteratively, so a deeply nested value gives a clear error, never a
    RecursionError.
    """
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, _SCALARS):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidParamsError(
                    f"{where} is {item!r}; JSON has no NaN or Infinity, send a "
                    "finite number or null",
                    path=where,
                )
            continue
        if depth >= max_depth:
            raise InvalidParamsError(
                f"{where} is nested deeper than {max_depth} levels "
                "(max_params_depth); flatten the structure",
                path=where,
            )
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise InvalidParamsError(
                        f"{where} has key {key!r} of type {type(key).__name__}; "
                        "JSON object keys must be strings",
                        path=where,
                    )
                stack.append((child, f"{where}.{key}", depth + 1))
        elif isinstance(item, list):
            for index, child in enumerate(item):
                stack.append((child, f"{where}[{index}]", depth + 1))
        else:
            raise InvalidParamsError(
                f"{where} is {_a(type(item).__name__)} ({_short(item)}), which JSON "
                "cannot carry unchanged; convert it yourself (for example a "
                "datetime to an ISO 8601 string, a set to a list)",
                path=where,
            )


def check_params(params: Any, *, max_bytes: int, max_depth: int) -> str:
    """Check params are a JSON object within limits; return their JSON text.

    Raises:
        InvalidParamsError: Not an object, or holds a value JSON cannot carry.
        ParamsTooLargeError: The JSON text is longer than ``max_bytes``.
    """
    if not isinstance(params, dict):
        raise InvalidParamsError(
            f"params must be a JSON object (got {json_type(params)}); wrap the "
            'value, for example {"items": [...]}'
        )
    check_json(params, path="params", max_depth=max_depth)
    text = dumps(params)
    size = len(text.encode())
    if size > max_bytes:
        raise ParamsTooLargeError(size, max_bytes)
    return text


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = object.__repr__(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _a(noun: str) -> str:
    """Return ``noun`` with its indefinite article ("a set", "an object")."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"
