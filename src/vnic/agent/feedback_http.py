"""Strict reading of one feedback request, and the per-source request budget.

Pure (no sockets, clock injected): :mod:`vnic.agent.feedback` feeds the bytes a
VM sent and answers what these functions decide. A VM is untrusted, so every
bound is checked before the work it would cost: the head (request line and
headers) is read only up to :data:`MAX_HEAD` bytes and :data:`MAX_HEADERS`
lines, a body only when its ``Content-Length`` is a plain decimal of at most
:data:`MAX_BODY` bytes (no ``Transfer-Encoding``: no chunked bodies), and a
body's JSON only after its nesting is known to be at most :data:`MAX_DEPTH`;
its strings are at most :data:`MAX_STRING` characters and it has at most
:data:`MAX_ITEMS` values, so what goes on to the feedback decision is small.

A refusal is a :class:`BadRequest`: the HTTP status and a
:class:`~vnic.errors.FieldError` naming the field (a header, ``request line``
or a path in the body), the value and what was expected.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from vnic.errors import FieldError, show_value
from vnic.model.loading import loads_json

#: Largest request head (request line and headers, with their line ends), in bytes.
MAX_HEAD: Final = 8 * 1024
#: Most header lines in a request.
MAX_HEADERS: Final = 32
#: Largest request body read, in bytes (a feedback request is well under 1 KiB).
MAX_BODY: Final = 16 * 1024
#: Deepest nesting of JSON objects and arrays in a body (``{"set": {"egress.loss":
#: {"mean": ...}}}`` is 3).
MAX_DEPTH: Final = 6
#: Longest JSON string (key or value) in a body, in characters (``why`` takes 500).
MAX_STRING: Final = 512
#: Most JSON values (keys, strings, numbers, objects, arrays...) in a body.
MAX_ITEMS: Final = 256
#: Methods the endpoint answers; paths it serves.
METHODS: Final = ("GET", "POST", "DELETE")
PATHS: Final = ("/v1/feedback", "/v1/feedback/")

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_LENGTH = re.compile(r"[0-9]+")
_TARGET = re.compile(r"[\x21-\x7e]{1,256}")


class BadRequest(Exception):
    """A request the endpoint refuses before anything else looks at it."""

    def __init__(self, status: int, path: str, value: str, expected: str) -> None:
        self.status = status
        self.error = FieldError(path, value, expected)
        super().__init__(str(self.error))

    def answer(self) -> dict[str, Any]:
        kind = {404: "not_found", 405: "not_allowed"}.get(self.status, "invalid")
        return {"error": kind, "message": str(self.error), "fields": [self.error.to_dict()]}


@dataclass(frozen=True)
class Head:
    """A request line and headers that passed: ``length`` is the body's size in bytes."""

    method: str
    target: str
    headers: Mapping[str, str] = field(default_factory=dict)
    length: int = 0


def _shown(raw: str, limit: int = 40) -> str:
    return show_value(raw if len(raw) <= limit else raw[:limit] + "...")


def head_end(data: bytes | bytearray, start: int = 0) -> int:
    """Where the head in ``data`` ends (index after its blank line), -1: not yet;
    ``start``: how far an earlier call looked (so a head sent a byte at a time is
    not searched again from the start each time).

    Raises :class:`BadRequest` (431) once ``data`` holds :data:`MAX_HEAD` bytes
    without a complete head.
    """
    end = data.find(b"\r\n\r\n", max(0, start - 3), MAX_HEAD)
    if end >= 0:
        return end + 4
    if len(data) >= MAX_HEAD:
        raise BadRequest(
            431, "request head", f"over {MAX_HEAD} bytes", f"at most {MAX_HEAD} bytes of head"
        )
    return -1


def parse_head(data: bytes | bytearray) -> Head:
    """The request line and headers of ``data`` (the head, as :func:`head_end` found it)."""
    text = bytes(data).decode("latin-1")
    lines = text.split("\r\n")
    while lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise BadRequest(400, "request line", "''", "METHOD /v1/feedback HTTP/1.1")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1") or not parts[0]:
        raise BadRequest(400, "request line", _shown(lines[0]), "METHOD /v1/feedback HTTP/1.1")
    method, target, _ = parts
    if not _TARGET.fullmatch(target) or target not in PATHS:
        raise BadRequest(404, "path", _shown(target), "/v1/feedback (nothing else is here)")
    if method not in METHODS:
        raise BadRequest(405, "method", _shown(method), "one of " + ", ".join(METHODS))
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest(
            431, "headers", f"{len(lines) - 1} lines", f"at most {MAX_HEADERS} header lines"
        )
    headers: dict[str, str] = {}
    lengths: list[str] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise BadRequest(400, "header", _shown(line), "NAME: VALUE (no folded lines)")
        value = value.strip(" \t")
        if not _VALUE.fullmatch(value):
            raise BadRequest(400, name, _shown(value), "a value without control characters")
        key = name.lower()
        if key == "content-length":
            lengths.append(value)
        headers[key] = value
    if "transfer-encoding" in headers:
        raise BadRequest(
            411,
            "Transfer-Encoding",
            _shown(headers["transfer-encoding"]),
            "no Transfer-Encoding: send the body with a Content-Length",
        )
    length = 0
    if len(lengths) > 1:
        raise BadRequest(400, "Content-Length", ", ".join(lengths)[:60], "one Content-Length")
    if lengths:
        raw = lengths[0]
        if not _LENGTH.fullmatch(raw):
            raise BadRequest(
                400,
                "Content-Length",
                _shown(raw),
                f"a decimal number of bytes from 0 to {MAX_BODY}",
            )
        if len(raw) > len(str(MAX_BODY)) or int(raw) > MAX_BODY:  # no int() of 8 KiB of digits
            raise BadRequest(
                413, "Content-Length", _shown(raw), f"at most {MAX_BODY} bytes of body"
            )
        length = int(raw)
    elif method == "POST":
        raise BadRequest(411, "Content-Length", "none", "a Content-Length for the body of a POST")
    return Head(method=method, target=target, headers=headers, length=length)


def _depth(text: str) -> int:
    """The deepest nesting of objects and arrays in ``text`` (JSON strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest  # no need to look further
        elif ch in "]}":
            depth -= 1
    return deepest


def _check_sizes(value: Any, path: str, count: list[int]) -> None:
    count[0] += 1
    if count[0] > MAX_ITEMS:
        raise BadRequest(400, "body", f"over {MAX_ITEMS} values", f"at most {MAX_ITEMS} values")
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise BadRequest(
                400, path or "body", f"{len(value)} characters", f"at most {MAX_STRING} characters"
            )
    elif isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(400, path or "body", repr(value), "a finite number")
    elif isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else key
            if len(key) > MAX_STRING:
                raise BadRequest(
                    400,
                    here[:60],
                    f"a key of {len(key)} characters",
                    f"keys of at most {MAX_STRING}",
                )
            count[0] += 1
            _check_sizes(item, here, count)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_sizes(item, f"{path}[{i}]", count)


def parse_body(data: bytes | bytearray) -> dict[str, Any]:
    """A request's JSON object (``{}`` for an empty body), within every bound above."""
    if not data:
        return {}
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(400, "body", f"byte {exc.start} not UTF-8", "UTF-8 JSON") from None
    deepest = _depth(text)
    if deepest > MAX_DEPTH:
        raise BadRequest(
            400, "body", f"nested over {MAX_DEPTH} deep", f"at most {MAX_DEPTH} levels of nesting"
        )
    try:
        # The project's strict JSON reader: duplicate keys and NaN/Infinity refused.
        doc = loads_json(text)
    except ValueError as exc:  # DocumentError, a too-long integer
        raise BadRequest(400, "body", _shown(text, 30), f"a JSON object ({exc})") from None
    if not isinstance(doc, dict):
        raise BadRequest(
            400, "body", type(doc).__name__, "a JSON object: {set: {...}} or {profile: NAME}"
        )
    _check_sizes(doc, "", [0])
    return doc


# --------------------------------------------------------------------------- budget

#: Requests per second a source may make to the endpoint, in the long run (every
#: connection counts, whatever it asks and whether it is well formed).
SOURCE_RATE: Final = 5.0
#: Requests a source may make at once after being quiet (the bucket's size).
SOURCE_BURST: Final = 20.0
#: Sources remembered before full buckets are forgotten.
MAX_SOURCES: Final = 1024


@dataclass
class _Bucket:
    tokens: float
    at: float


class SourceBudget:
    """A token bucket per source: :data:`SOURCE_BURST` requests at once, refilled at
    :data:`SOURCE_RATE` per second. Not thread-safe (the endpoint's loop owns it)."""

    def __init__(self, rate: float = SOURCE_RATE, burst: float = SOURCE_BURST) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[Any, _Bucket] = {}

    def take(self, source: Any, now: float) -> float:
        """Count one request of ``source`` at ``now`` (monotonic seconds): 0.0 when it
        may go on, else the seconds until it may ask again (nothing taken)."""
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= MAX_SOURCES:
                self._forget_full(now)
            bucket = self._buckets[source] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        full = [
            s for s, b in self._buckets.items() if b.tokens + (now - b.at) * self.rate >= self.burst
        ]
        for source in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[source]

    def __len__(self) -> int:
        return len(self._buckets)
