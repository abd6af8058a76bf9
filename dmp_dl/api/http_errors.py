"""Errors of the HTTP API: one JSON body for every error, and the OpenAPI declarations that say so.

Every error answer is ``{"detail": str, "error": code}`` with a 4xx status (:class:`ErrorBody`):
``detail`` says what is wrong in one line, ``error`` is a stable machine-readable code
(:data:`ERROR_CODES`). A 422 from request validation also lists the failing fields in ``errors``;
a 404 for an unknown id names the id's ``kind`` (``user`` or ``item``).

For an endpoint:

* raise :class:`ApiError` (an ``HTTPException`` with a code), or a :class:`~dmp_dl.core.errors.DmpError`
  (:func:`install_error_handlers` maps unknown ids to 404, a part the bundle lacks to 409, a bad
  request value to 422);
* declare what it can answer with ``responses=error_responses(401, 404, 422)`` in the route
  decorator, so the OpenAPI document (and the clients generated from it) knows each status and its
  schema. 500 is never declared: any answer over 499 is a bug, and still comes as this JSON body.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from dmp_dl.core.errors import BundleError, DmpError, UnknownIdError
from dmp_dl.store.bundle import MissingPartError

log = logging.getLogger(__name__)

ERROR_CODES: dict[int, str] = {
    400: "bad_request",  # the body could not be parsed
    401: "unauthorized",  # missing or wrong bearer token
    403: "forbidden",  # the server is not configured to allow this
    404: "not_found",  # no such path (an unknown user/item id is "unknown_id")
    405: "method_not_allowed",
    409: "unavailable",  # the bundle lacks the part the request needs, or the operation is not possible now
    413: "too_large",  # the body is over the server's max_body_bytes
    415: "unsupported_media_type",
    422: "invalid_request",  # a parameter or body field is missing, of the wrong type or out of range
    500: "internal",  # a bug: never declared, reported in the server log
}
DESCRIPTIONS: dict[int, str] = {
    400: "The request body is not valid JSON text (error `bad_request`).",
    401: "Missing or invalid bearer token (error `unauthorized`).",
    403: "Not allowed on this server, e.g. without a token configured (error `forbidden`).",
    404: "An id the bundle does not know (error `unknown_id`, `kind` names user or item).",
    409: "The bundle lacks what the request needs, or the operation is not available on this server "
         "(error `unavailable`; `bad_bundle` when a bundle to switch to is refused).",
    413: "The request body is larger than the server accepts (error `too_large`).",
    422: "A parameter or body field is missing, of the wrong type or out of range (error `invalid_request`; "
         "`errors` lists the fields).",
}


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="where: e.g. [\"body\", \"history\", 3] or [\"query\", \"k\"]")
    msg: str
    type: str


class ErrorBody(BaseModel):
    """The body of every error answer."""

    model_config = ConfigDict(extra="forbid")
    detail: str = Field(description="what is wrong and what to do, in one line")
    error: str = Field(description="machine-readable code: " + ", ".join(sorted(set(ERROR_CODES.values()) - {"internal"}
                                                                              | {"unknown_id", "bad_bundle", "token_required"})))
    kind: str | None = Field(None, description="with unknown_id: which kind of id (user, item)")
    errors: list[FieldError] | None = Field(None, description="with a validation error: each failing field")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route that can answer ``statuses``, all with :class:`ErrorBody`."""
    return {status: {"model": ErrorBody, "description": DESCRIPTIONS.get(status, ERROR_CODES.get(status, "error"))}
            for status in statuses}


def one_line(text: str, limit: int = 2000) -> str:
    """``text`` on one line: control characters (a newline in a field name or path the client sent)
    escaped, and cut at ``limit`` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_response(status: int, detail: str, error: str | None = None, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    """A JSON error answer (``extra``: further :class:`ErrorBody` fields, e.g. ``kind``)."""
    body: dict[str, Any] = {"detail": one_line(detail), "error": error or ERROR_CODES.get(status, "error")}
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status, headers=headers)


class ApiError(HTTPException):
    """An ``HTTPException`` with a machine-readable ``error`` code (default: the status's)."""

    def __init__(self, status: int, detail: str, error: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status, detail, headers=headers)
        self.error = error or ERROR_CODES.get(status, "error")


def _summary(errors: list[dict]) -> str:
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(x)[:60] for x in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def install_error_handlers(app: FastAPI, status_of: dict[type[DmpError], tuple[int, str]] | None = None,
                           explain: Callable[[dict], str | None] | None = None) -> None:
    """Answer every error of ``app`` with :class:`ErrorBody`.

    status_of: further :class:`DmpError` subclasses -> (status, code), checked before the defaults
    (unknown id 404 ``unknown_id``; a bundle problem, including a missing part, 409; any other
    DmpError 422 ``invalid_request``).
    explain: a validation error (pydantic's dict: ``loc``, ``msg``, ``type``) -> a clearer message
    for it, or None to keep pydantic's.
    """
    mapping: list[tuple[type[DmpError], tuple[int, str]]] = [
        *(status_of or {}).items(),
        (UnknownIdError, (404, "unknown_id")),
        (MissingPartError, (409, "unavailable")),
        (BundleError, (409, "bad_bundle")),
        (DmpError, (422, "invalid_request")),
    ]

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Starlette names the first route's methods only: list every route's at this path
            allowed = set()
            for route in request.app.router.routes:
                if route.matches(request.scope)[0] != Match.NONE:
                    allowed |= set(getattr(route, "methods", None) or ())
            headers["Allow"] = ", ".join(sorted(allowed)) or headers.get("Allow", "")
            detail = f"method not allowed: {request.method} {request.url.path}; use {headers['Allow']}"
        return error_response(exc.status_code, detail, getattr(exc, "error", None), headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_failed(request: Request, exc: RequestValidationError):
        errors = [{"loc": [x if isinstance(x, (str, int)) else str(x) for x in e.get("loc", ())],
                   "msg": (explain and explain(e)) or str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        return error_response(422, _summary(errors), "invalid_request", errors=errors)

    @app.exception_handler(DmpError)
    async def dmp_error(request: Request, exc: DmpError):
        for cls, (status, code) in mapping:
            if isinstance(exc, cls):
                return error_response(status, str(exc), code, kind=getattr(exc, "kind", None) if status == 404 else None)
        return error_response(422, str(exc), "invalid_request")  # unreachable: DmpError is the last entry

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # a bug: logged in full, answered in one line
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log", "internal")
