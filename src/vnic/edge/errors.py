"""The one table from error to HTTP answer, shared by the manager's and the agent's servers.

Every error is a :class:`~vnic.errors.VnicError`; it leaves with the status of its
kind and the body ``{error, message, fields: [{field, value, expected}]}``.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from vnic.errors import VnicError


class FieldProblem(BaseModel):
    field: str = Field(description="Dotted path of the field, e.g. egress.rate")
    value: str = Field(description="The value given, as text")
    expected: str = Field(description="What would have been accepted")


class ErrorBody(BaseModel):
    error: str = Field(description="Error kind: invalid, not_found, conflict, in_use, ...")
    message: str
    fields: list[FieldProblem] | None = None


def error_response(exc: VnicError) -> JSONResponse:
    """The one table from error to HTTP answer."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
    return JSONResponse(exc.to_dict(), status_code=exc.http_status, headers=headers)


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (401, "No token, or an unknown one"),
        (403, "The token's role may not do this"),
        (404, "A named object does not exist"),
        (409, "Conflicts with the current state (exists, in use, exhausted)"),
        (422, "Invalid input: every problem names field, value and expectation"),
        (429, "Too many requests of this kind in flight; retry after Retry-After seconds"),
        (500, "An unexpected error; the manager's log has it under the reference given"),
        (503, "The host agent did not answer"),
        (507, "A disk is full (named in the message); nothing was changed"),
    )
}
