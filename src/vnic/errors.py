"""The one error hierarchy of vnic.

Every error a user can cause is a :class:`VnicError`. Each kind carries the
HTTP status the manager answers with and the exit code the CLI exits with, so
the API, the CLI and the UI report the same failure the same way. Input errors
are collected per field: a :class:`FieldError` names the field path, the value
that was given and what was expected.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class FieldError:
    """One problem with one field of an input document.

    ``path`` is dotted (``egress.burst``, ``qos.egress[0].ceiling``); ``value``
    is what the user gave, as text; ``expected`` says what would have been
    accepted.
    """

    path: str
    value: str
    expected: str

    def __str__(self) -> str:
        where = self.path or "(document)"
        return f"{where}: got {self.value}; expected {self.expected}"

    def to_dict(self) -> dict[str, str]:
        return {"field": self.path, "value": self.value, "expected": self.expected}

    def under(self, prefix: str) -> FieldError:
        """The same error with its path placed below ``prefix``."""
        if not prefix:
            return self
        if not self.path:
            path = prefix
        elif self.path.startswith("["):
            path = prefix + self.path
        else:
            path = f"{prefix}.{self.path}"
        return FieldError(path, self.value, self.expected)


#: Longest user text quoted whole in an error; longer text is cut, its length said.
SHOWN_MAX = 200


def shorten(text: str, limit: int = SHOWN_MAX) -> str:
    """``text``, or its first ``limit`` characters and how long it was (a megabyte given
    in a field must not come back in every error body and log line)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def show_value(value: Any) -> str:
    """How a user-given value is quoted in an error message (long text cut, see
    :func:`shorten`)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= SHOWN_MAX else shorten(repr(value))
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value.bit_length() > 256:
        return f"an integer of {value.bit_length()} bits"  # repr() refuses over 4300 digits
    return shorten(repr(value))


class VnicError(Exception):
    """Base of every error vnic reports to a user."""

    http_status: ClassVar[int] = 400
    exit_code: ClassVar[int] = 2
    kind: ClassVar[str] = "error"

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.kind, "message": str(self)}


class InvalidInput(VnicError):
    """One or more fields of an input were refused; nothing was changed."""

    http_status = 422
    kind = "invalid"

    def __init__(self, errors: Sequence[FieldError]) -> None:
        if not errors:
            raise ValueError("InvalidInput needs at least one FieldError")
        self.errors: tuple[FieldError, ...] = tuple(errors)
        super().__init__("; ".join(str(e) for e in self.errors))

    @classmethod
    def one(cls, path: str, value: Any, expected: str) -> InvalidInput:
        return cls([FieldError(path, show_value(value), expected)])

    def under(self, prefix: str) -> InvalidInput:
        return InvalidInput([e.under(prefix) for e in self.errors])

    @property
    def paths(self) -> list[str]:
        return [e.path for e in self.errors]

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": self.kind,
            "message": str(self),
            "fields": [e.to_dict() for e in self.errors],
        }


class NotFound(VnicError):
    """A named object does not exist."""

    http_status = 404
    kind = "not_found"

    def __init__(self, what: str, name: str, known: Iterable[str] = ()) -> None:
        known = sorted(known)
        hint = f"; known: {', '.join(known)}" if known else ""
        # show_value: a name from a URL may be a megabyte; it is quoted cut.
        super().__init__(f"{what} {show_value(name)} does not exist{hint}")
        self.what = what
        self.name = name


class Conflict(VnicError):
    """The request contradicts the current state (already exists, in use, overlap...)."""

    http_status = 409
    kind = "conflict"


class InUse(Conflict):
    """An object cannot be removed because others refer to it."""

    kind = "in_use"

    def __init__(self, what: str, name: str, users: Iterable[str]) -> None:
        self.users = sorted(users)
        super().__init__(
            f"{what} {name!r} is in use by {', '.join(self.users)}; remove those uses first"
        )


class Exhausted(Conflict):
    """A pool (MAC range, network ids) has no free element left."""

    kind = "exhausted"


class Unauthenticated(VnicError):
    """No token, or a token vnic does not know."""

    http_status = 401
    kind = "unauthenticated"


class Forbidden(VnicError):
    """The token is valid but its role may not do this."""

    http_status = 403
    kind = "forbidden"


class Unavailable(VnicError):
    """A component vnic needs (an agent, the database) did not answer."""

    http_status = 503
    exit_code = 3
    kind = "unavailable"


class Unsupported(VnicError):
    """The target (driver, kernel) cannot do what was asked."""

    http_status = 422
    kind = "unsupported"


class DataplaneError(VnicError):
    """The kernel refused or did not keep what a plan asked for."""

    http_status = 500
    kind = "dataplane"


class Busy(Unavailable):
    """Too many requests of this kind are in flight: refused at once, retry later (429)."""

    http_status = 429
    kind = "busy"


class TooSlow(VnicError):
    """A request's body did not arrive in time: refused before it took a slot (408)."""

    http_status = 408
    kind = "too_slow"


class NoSpace(VnicError):
    """A file or the database could not be written: its disk is full. Nothing changed (507)."""

    http_status = 507
    kind = "no_space"


def storage_error(exc: BaseException, database: str = "the database") -> NoSpace | None:
    """``exc`` as :class:`NoSpace` when a full disk (or quota) caused it, else None.

    Looks through the causes (SQLAlchemy wraps sqlite3's error): an ``OSError``
    names its file; SQLite's "database or disk is full" is named ``database``
    (its file path, or URL), and so is its "disk I/O error" when that file's
    filesystem has no free block left (SQLite cannot make its shared-memory
    index there, and says only that).
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            where = seen.filename if seen.filename is not None else "a file"
            return NoSpace(f"no space left on device for {where}; nothing was changed")
        if isinstance(seen, sqlite3.OperationalError) and (
            "disk is full" in str(seen) or ("disk I/O error" in str(seen) and _full(database))
        ):
            return NoSpace(f"no space left on device for {database}; nothing was changed")
        seen = seen.__cause__ or seen.__context__
    return None


def _full(path: str) -> bool:
    """Whether the filesystem holding ``path`` (an absolute file path) is full."""
    if not os.path.isabs(path):
        return False  # a URL, or no name: nothing to look at
    folder = os.path.dirname(path)
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail == 0 or st.f_favail == 0


#: Every error kind, by the ``error`` field of its API body (the client maps bodies back).
KINDS: dict[str, type[VnicError]] = {
    cls.kind: cls
    for cls in (
        VnicError,
        InvalidInput,
        NotFound,
        Conflict,
        InUse,
        Exhausted,
        Unauthenticated,
        Forbidden,
        Unavailable,
        Unsupported,
        DataplaneError,
        Busy,
        TooSlow,
        NoSpace,
    )
}


def error_from_body(body: Any) -> VnicError:
    """The error an API error body describes (``{error, message, fields}``), for clients.

    The instance has the kind's class, so status, exit code and ``except``
    clauses behave as for the original; only its message is carried over.
    """
    if not isinstance(body, dict):
        body = {"message": str(body)}
    kind = str(body.get("error", "error"))
    message = str(body.get("message", "unknown error"))
    fields = body.get("fields")
    if kind == "invalid" and isinstance(fields, list) and fields:
        return InvalidInput(
            [FieldError(str(f["field"]), str(f["value"]), str(f["expected"])) for f in fields]
        )
    cls = KINDS.get(kind, VnicError)
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error
