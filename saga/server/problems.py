"""Errors as RFC 9457 problem details (``application/problem+json``).

Every error the API returns is one `Problem`: a ``type`` URI naming the kind of problem (a
stable, relative ``/problems/<slug>`` reference that a client can switch on), a ``title`` for
people, the HTTP ``status``, a ``detail`` that says what was wrong with this request and what
to do, and the ``instance`` (the request's path). Validation failures add ``errors``: one
entry per invalid field, with its location and message. The handlers installed by
`install_handlers` turn FastAPI's own failures (a malformed JSON body, a missing field, an
unknown route) into the same shape, so that a client parses one format whatever went wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["PROBLEM_JSON", "Problem", "install_handlers", "problem_response"]

PROBLEM_JSON = "application/problem+json"
"""The media type of a problem details document."""

_TITLES = {
    400: "Bad request",
    401: "Authentication required",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    422: "Invalid input",
    503: "Service unavailable",
}


class Problem(Exception):
    """An error the API answers with a problem details document.

    Args:
        status: The HTTP status.
        slug: The kind of problem (the ``type`` is ``/problems/<slug>``).
        detail: What was wrong with this request, and what to do.
        title: A short summary of the kind (default: the status's).
        errors: For validation problems, one mapping per invalid field (``loc``, ``msg``).
        headers: Extra response headers (``WWW-Authenticate`` on a 401).
    """

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        title: str | None = None,
        errors: Sequence[Mapping[str, Any]] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.title = title or _TITLES.get(status, "Error")
        self.errors = list(errors)
        self.headers = dict(headers or {})

    def body(self, instance: str) -> dict[str, Any]:
        """The problem details document for a request to ``instance``."""
        body: dict[str, Any] = {
            "type": f"/problems/{self.slug}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
        }
        if self.errors:
            body["errors"] = self.errors
        return body


def problem_response(problem: Problem, instance: str) -> JSONResponse:
    """The response carrying ``problem`` for a request to ``instance``."""
    return JSONResponse(
        problem.body(instance),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=problem.headers,
    )


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {
            "loc": [str(part) for part in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": e.get("type", ""),
        }
        for e in exc.errors()
    ]


def install_handlers(app: FastAPI) -> None:
    """Makes every error of ``app`` a problem details document."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return problem_response(exc, request.url.path)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = _validation_errors(exc)
        if any(e["type"] == "json_invalid" for e in errors):
            problem = Problem(
                400,
                "malformed-json",
                "the request body is not valid JSON: " + "; ".join(e["msg"] for e in errors),
                title="Malformed JSON",
                errors=errors,
            )
        else:
            where = ", ".join(".".join(e["loc"]) for e in errors)
            problem = Problem(
                422, "invalid-request", f"the request is invalid ({where})", errors=errors
            )
        return problem_response(problem, request.url.path)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such resource: {request.url.path}"
        problem = Problem(exc.status_code, slug, detail, headers=exc.headers)
        return problem_response(problem, request.url.path)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
