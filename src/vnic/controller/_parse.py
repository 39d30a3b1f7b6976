"""Small readers shared by the controller's documents (rules, scenarios, feedback limits).

Every reader raises :class:`~vnic.errors.InvalidInput` naming the field path it
was given, the value and what was expected. Time spans here are not
:class:`~vnic.model.units.Duration` (a kernel quantity capped at about 71
minutes): a rule's cooldown or a scenario's timeline may run for hours, and
``10m`` reads as ten minutes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Final, ParamSpec, TypeVar

from vnic.errors import FieldError, InvalidInput
from vnic.model.fields import parse_field
from vnic.model.patch import join
from vnic.model.units import MAX_TEXT, scan_number

T = TypeVar("T")


def check_short(text: str, path: str, expected: str) -> None:
    """Refuse ``text`` longer than :data:`~vnic.model.units.MAX_TEXT` before reading it
    (as the unit parsers do: no reader then sees a megabyte)."""
    if len(text) > MAX_TEXT:
        raise InvalidInput.one(path, text, f"{expected}, at most {MAX_TEXT} characters")


P = ParamSpec("P")

SPAN_EXPECTED: Final = "a time span such as 500ms, 30s, 10m or 2h"
#: Longest span a controller document takes: one year.
SPAN_MAX_NS: Final = 366 * 24 * 3600 * 10**9
_SPAN_UNITS: Final = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "min": 60 * 10**9,
    "h": 3600 * 10**9,
}
_SPAN_PRINT: Final = (("h", 3600 * 10**9), ("m", 60 * 10**9), ("s", 10**9), ("ms", 10**6))


def span_ns(raw: Any, path: str, *, positive: bool = False) -> int:
    """Read a time span into integer nanoseconds. A bare number is allowed only for 0."""
    expected = SPAN_EXPECTED + (", above 0" if positive else "")
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise InvalidInput.one(path, raw, expected)
    if isinstance(raw, str):
        check_short(raw, path, expected)
    if isinstance(raw, int) and abs(raw) >= 10**MAX_TEXT:
        raise InvalidInput.one(path, raw, f"{expected}, at most 366 days")
    parts = scan_number(str(raw))  # one pass: no pattern that backtracks on spaces
    if parts is None or parts[0]:
        raise InvalidInput.one(path, raw, expected)
    try:
        amount = Decimal(parts[1])
    except InvalidOperation:  # pragma: no cover - the scanner admits only decimals
        raise InvalidInput.one(path, raw, expected) from None
    unit = parts[2].lower()
    if not unit:
        if amount != 0:
            raise InvalidInput.one(path, raw, f"{expected} (a unit is required)")
        unit = "s"
    if unit not in _SPAN_UNITS:
        raise InvalidInput.one(path, raw, f"{expected} (unknown unit {unit!r})")
    ns = int((amount * _SPAN_UNITS[unit]).to_integral_value())
    if ns > SPAN_MAX_NS:
        raise InvalidInput.one(path, raw, f"{expected}, at most 366 days")
    if positive and ns == 0:
        raise InvalidInput.one(path, raw, expected)
    return ns


def span(raw: Any, path: str, *, positive: bool = False) -> float:
    """A time span in seconds (see :func:`span_ns`)."""
    return span_ns(raw, path, positive=positive) / 1e9


def dump_span(seconds: float) -> str:
    """Canonical text of a span in seconds: the largest unit that is exact (``90s``, ``10m``)."""
    ns = round(seconds * 1e9)
    for name, factor in _SPAN_PRINT:
        if ns % factor == 0:
            return f"{ns // factor}{name}"
    if ns % 1000 == 0:
        return f"{ns // 1000}us"
    return f"{ns}ns"


def show_seconds(seconds: float) -> str:
    """A span for a message: ``5.0 s``, ``0.25 s``."""
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds:.3g} s"


def mapping(raw: Any, path: str, what: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise InvalidInput.one(path, raw, what)
    return raw


def known_keys(doc: Mapping[str, Any], path: str, allowed: Sequence[str]) -> list[FieldError]:
    """An error for every key of ``doc`` not in ``allowed``."""
    return [
        FieldError(join(path, str(k)), "unknown key", "one of " + ", ".join(allowed))
        for k in doc
        if k not in allowed
    ]


def boolean(raw: Any, path: str) -> bool:
    if isinstance(raw, bool):
        return raw
    raise InvalidInput.one(path, raw, "true or false")


def number(raw: Any, path: str, expected: str) -> float:
    """A finite number (int, float, or decimal text)."""
    if isinstance(raw, bool):
        raise InvalidInput.one(path, raw, expected)
    if isinstance(raw, int) and abs(raw) >= 10**MAX_TEXT:
        raise InvalidInput.one(path, raw, expected)  # float() would overflow
    if isinstance(raw, int | float):
        value = float(raw)
    elif isinstance(raw, str):
        check_short(raw, path, expected)
        try:
            value = float(Decimal(raw.strip()))
        except InvalidOperation:
            raise InvalidInput.one(path, raw, expected) from None
    else:
        raise InvalidInput.one(path, raw, expected)
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidInput.one(path, raw, expected)
    return value


def collect(errors: list[FieldError], read: Callable[[], T], default: T) -> T:
    """Run ``read``; on :class:`InvalidInput` keep its errors and return ``default``."""
    try:
        return read()
    except InvalidInput as exc:
        errors.extend(exc.errors)
        return default


def attempt(
    errors: list[FieldError], read: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T | None:
    """``read(*args)``; on :class:`InvalidInput` keep its errors and return None."""
    try:
        return read(*args, **kwargs)
    except InvalidInput as exc:
        errors.extend(exc.errors)
        return None


def field_value(field_path: str, raw: Any, path: str) -> Any:
    """``raw`` read with the parser of profile field ``field_path``; errors name ``path``."""
    try:
        return parse_field(field_path, raw)
    except InvalidInput as exc:
        raise InvalidInput(
            [
                FieldError(path + e.path[len(field_path) :], e.value, e.expected)
                if e.path.startswith(field_path)
                else e.under(path)
                for e in exc.errors
            ]
        ) from None
