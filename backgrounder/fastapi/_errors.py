"""The one table that turns backgrounder's exceptions into HTTP answers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from backgrounder.errors import (
    BackendError,
    ConfigurationError,
    CorruptJobError,
    IdempotencyConflictError,
    InvalidParamsError,
    JobNotFoundError,
    JobStateError,
    ParamsTooLargeError,
    ResourceRequestError,
    SubmitError,
    UnknownTaskError,
)

__all__ = [
    "ERROR_STATUS",
    "BackgrounderRoute",
    "BodyTooLargeError",
    "ManagerUnavailableError",
    "error_response",
]

logger = logging.getLogger(__name__)


class ManagerUnavailableError(ConfigurationError):
    """Raised when a route is hit while no started JobManager serves the app.

    Either ``setup_backgrounder(app)`` was never called (the router was mounted on
    its own), the app's lifespan has not started it, or it is shutting down.
    """


class BodyTooLargeError(ParamsTooLargeError):
    """Raised when a ``POST /jobs`` body is longer than params may ever be."""

    def __init__(self, body_limit: int, params_limit: int) -> None:
        SubmitError.__init__(
            self,
            f"request body is larger than {body_limit} bytes; params are limited to "
            f"{params_limit} bytes of JSON (max_params_bytes). Store large inputs "
            "elsewhere and pass a reference.",
        )
        self.size = None
        self.limit = params_limit


#: Exception classes and the status they answer, most specific first. A route
#: never catches these itself; BackgrounderRoute looks the exception up here.
ERROR_STATUS: Sequence[tuple[type[BaseException], int]] = (
    (ManagerUnavailableError, 503),
    (ParamsTooLargeError, 413),
    (IdempotencyConflictError, 409),
    (UnknownTaskError, 422),
    (InvalidParamsError, 422),
    (ResourceRequestError, 422),
    (SubmitError, 422),
    (JobNotFoundError, 404),
    (JobStateError, 409),
    # A stored record nobody can read: retrying will not help; say which job.
    (CorruptJobError, 500),
    (BackendError, 503),
    # A manager that stops between the dependency check and the call says so
    # with a ConfigurationError: it is not serving, so the answer is 503.
    (ConfigurationError, 503),
    (RequestValidationError, 422),
    (ValidationError, 422),
    # Filters, limits and cursors the manager or store refuses.
    (ValueError, 422),
)


def _describe_validation(errors: Sequence[Any]) -> str:
    parts = []
    for error in errors:
        loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        message = error.get("msg", "invalid value").removeprefix("Value error, ")
        # A message of ours already shows the value it got; pydantic's do not.
        shows_value = "(got " in message
        if "input" in error and error.get("type") != "missing" and not shows_value:
            value = repr(error["input"])
            if len(value) > 60:
                value = value[:57] + "..."
            message = f"{message} (got {value})"
        parts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(parts) or "invalid request"


def error_response(exc: BaseException) -> JSONResponse | None:
    """Return the JSON answer for ``exc``, or None when the table has no entry."""
    status = next((code for kind, code in ERROR_STATUS if isinstance(exc, kind)), 0)
    if not status:
        return None
    if isinstance(exc, RequestValidationError | ValidationError):
        detail = _describe_validation(exc.errors())
    else:
        detail = str(exc) or type(exc).__name__
    headers = {"Retry-After": "5"} if status == 503 else None
    if status >= 500:
        logger.warning(
            "answering %d: %s", status, detail, extra={"event": "http.unavailable"}
        )
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class BackgrounderRoute(APIRoute):
    """An APIRoute that answers backgrounder's exceptions from ERROR_STATUS.

    The table applies to backgrounder's routes only, so an app's own handlers for
    ValueError and friends are left alone. Exceptions with no entry (an app's
    HTTPException from an auth dependency, a bug) go on to the app as usual.
    """

    def get_route_handler(
        self,
    ) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """Wrap FastAPI's handler so table entries become JSON answers."""
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                response = error_response(exc)
                if response is None:
                    raise
                return response

        return handle
