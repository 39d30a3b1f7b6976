"""Units as types.

Every quantity in a profile is one of these types. They parse text once at
the edge (``"10Mbit"``, ``"1.5gbit"``, ``"250us"``, ``"0.5%"``;
case-insensitive, decimals allowed), keep an integer in base units inside, and
print canonically, so that ``T.parse(str(x)) == x`` for every value.

Base units and limits (the limits are what the kernel interfaces take):

=============  ==================  =============================================
type           base unit           range
=============  ==================  =============================================
``Rate``       bit/s               1 .. 2**63-1 (HTB/netem take 64-bit rates)
``ByteSize``   byte                0 .. 2**32-1 (tc burst, limit are u32)
``Duration``   nanosecond          0 .. (2**32-1) us (tc times are u32 usec)
``Probability`` part per billion   0 .. 10**9 (0 % .. 100 %)
``QueueLimit`` byte or packet      1 .. 2**32-1
``MacAddress`` 48-bit integer      any; ``MacRange`` only local unicast
``Dscp``       code point          0 .. 63 (or a name: ef, af11..af43, cs0..cs7)
=============  ==================  =============================================

Decimal prefixes are SI (``k`` = 1000) for bits and bytes alike; binary
prefixes are spelt ``Ki``, ``Mi``, ``Gi``, ``Ti``. Note that ``tc`` reads
``kb`` as 1024 bytes and ``mbps`` as megabytes per second; vnic reads ``KB``
as 1000 bytes and refuses ``bps`` forms as ambiguous.

A value finer than the base unit is rounded half-to-even to it; a non-zero
value that would round to zero is refused rather than silently turned off.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import ClassVar, Final, Self

from vnic.errors import shorten, show_value


class UnitError(ValueError):
    """A value could not be read as a unit type.

    ``value`` is the offending input as text; ``expected`` names the accepted
    forms. ``str()`` gives a sentence that carries both.
    """

    def __init__(self, value: object, expected: str, reason: str | None = None) -> None:
        # A long value is shown cut (its length said): errors travel in API bodies and logs.
        if isinstance(value, str):
            self.value = shorten(value)
        elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
            self.value = show_value(value)  # repr() refuses ints over 4300 digits
        else:
            self.value = shorten(repr(value))
        self.expected = expected if reason is None else f"{expected} ({reason})"
        super().__init__(f"{self.value!r}: expected {self.expected}")


#: Longest text a unit value may be (``"  1.5 Gbit/s "`` is 13). Checked before any
#: scanning, so a megabyte of input costs one ``len()``; the scanners below are single
#: passes anyway (a backtracking pattern on runs of spaces froze the manager, issue #15).
MAX_TEXT: Final = 64
_DIGITS: Final = frozenset("0123456789")
#: Characters of a unit suffix: ASCII letters (any case), micro, "/" of "/s", "%".
_SUFFIX_CHARS: Final = frozenset(string.ascii_letters + "µ/%")


def check_length(text: str, expected: str, limit: int = MAX_TEXT) -> None:
    """Refuse ``text`` longer than ``limit`` characters (before anything reads it)."""
    if len(text) > limit:
        raise UnitError(text, expected, f"at most {limit} characters, got {len(text)}")


def scan_number(text: str) -> tuple[str, str, str] | None:
    """``(sign, number, suffix)`` of ``" -1.5 Gbit "``, or None when it is not of that shape.

    The shape is: optional sign, a decimal (``1``, ``1.``, ``1.5``, ``.5``), a suffix of
    letters, ``µ``, ``/`` or ``%``, with whitespace allowed around the sign and the number.
    One left-to-right pass, no backtracking: linear in the length.
    """
    s = text.strip()
    n = len(s)
    i = 0
    sign = ""
    if i < n and s[i] in "+-":
        sign = s[i]
        i += 1
    while i < n and s[i].isspace():
        i += 1
    start = i
    while i < n and s[i] in _DIGITS:
        i += 1
    digits = i - start
    if i < n and s[i] == ".":
        i += 1
        fraction = i
        while i < n and s[i] in _DIGITS:
            i += 1
        digits += i - fraction
    if digits == 0:
        return None
    number = s[start:i]
    while i < n and s[i].isspace():
        i += 1
    suffix_start = i
    while i < n and s[i] in _SUFFIX_CHARS:
        i += 1
    if i != n:
        return None
    return sign, number, s[suffix_start:i]


_ASCII_DIGITS = re.compile(r"[0-9]+")


def is_ascii_digits(text: str) -> bool:
    """Whether ``text`` is a whole number in ASCII digits (``str.isdigit`` also takes "²"),
    of at most :data:`MAX_TEXT` digits (so ``int()`` of it is cheap and never reaches
    Python's 4300-digit limit)."""
    return len(text) <= MAX_TEXT and _ASCII_DIGITS.fullmatch(text) is not None


def _split(text: object, expected: str) -> tuple[Decimal, str]:
    """Split ``"1.5 Gbit"`` into ``(Decimal('1.5'), 'gbit')``; refuse negatives and junk."""
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise UnitError(text, expected, "not text")
    if isinstance(text, float) and not math.isfinite(text):
        raise UnitError(text, expected, "not a finite number")
    if isinstance(text, str):
        check_length(text, expected)
    elif isinstance(text, int) and abs(text) >= 10**MAX_TEXT:
        raise UnitError(f"an integer of {text.bit_length()} bits", expected, "too large")
    # str(0.00001) is "1e-05": spell floats out in plain decimals first (our own text,
    # so not bounded like the user's).
    raw = format(Decimal(repr(text)), "f") if isinstance(text, float) else str(text)
    parts = scan_number(raw)
    if parts is None:
        if raw.strip().lower() in {"nan", "inf", "-inf", "+inf", "infinity"}:
            raise UnitError(text, expected, "not a finite number")
        raise UnitError(text, expected)
    sign, number, suffix = parts
    if sign == "-" and Decimal(number) != 0:
        raise UnitError(text, expected, "must not be negative")
    return Decimal(number), suffix.lower()


def _to_int(amount: Decimal, text: object, expected: str) -> int:
    try:
        whole = int(amount.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    except InvalidOperation as exc:  # pragma: no cover - guarded by the limits below
        raise UnitError(text, expected, "too large") from exc
    if whole == 0 and amount != 0:
        raise UnitError(text, expected, "finer than the smallest step")
    return whole


def _canonical(value: int, units: list[tuple[str, int]]) -> str:
    """Shortest exact spelling of ``value`` among ``units`` (name, factor)."""
    best: tuple[int, int, str] | None = None
    for order, (name, factor) in enumerate(units):
        if value % factor == 0:
            text = f"{value // factor}{name}"
            key = (len(text), order, text)
            if best is None or key < best:
                best = key
    assert best is not None  # units always include factor 1
    return best[2]


@dataclass(frozen=True, order=True)
class _Scalar:
    """An integer quantity in base units with a unit table."""

    value: int

    UNITS: ClassVar[dict[str, int]] = {}
    PRINT_UNITS: ClassVar[list[tuple[str, int]]] = []
    EXPECTED: ClassVar[str] = ""
    MIN: ClassVar[int] = 0
    MAX: ClassVar[int] = 2**63 - 1
    BARE_NUMBERS: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise TypeError(f"{type(self).__name__} holds an int in base units, got {self.value!r}")
        if not self.MIN <= self.value <= self.MAX:
            raise UnitError(str(self.value), self.EXPECTED, self._range_text())

    @classmethod
    def _range_text(cls) -> str:
        lo = cls._print(cls.MIN)
        hi = cls._print(cls.MAX)
        return f"between {lo} and {hi}"

    @classmethod
    def _print(cls, value: int) -> str:
        return _canonical(value, cls.PRINT_UNITS)

    @classmethod
    def parse(cls, text: object) -> Self:
        """Read ``text`` (or an existing instance, returned as is)."""
        if isinstance(text, cls):
            return text
        amount, suffix = _split(text, cls.EXPECTED)
        if not suffix:
            if not cls.BARE_NUMBERS:
                raise UnitError(text, cls.EXPECTED, "a unit is required")
            suffix = ""
        factor = cls._factor(suffix, text)
        whole = _to_int(amount * factor, text, cls.EXPECTED)
        if not cls.MIN <= whole <= cls.MAX:
            raise UnitError(text, cls.EXPECTED, cls._range_text())
        return cls(whole)

    @classmethod
    def _factor(cls, suffix: str, text: object) -> Decimal:
        try:
            return Decimal(cls.UNITS[suffix])
        except KeyError:
            raise UnitError(text, cls.EXPECTED, f"unknown unit {suffix!r}") from None

    def __str__(self) -> str:
        return self._print(self.value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


_SI = [("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3)]
_BIN = [("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)]


class Rate(_Scalar):
    """A bit rate in bit/s, on the wire (Ethernet frame including header).

    Accepts ``bit``, ``kbit``, ``mbit``, ``gbit``, ``tbit`` (SI) and ``kibit``
    .. ``tibit`` (binary), optionally followed by ``/s``.
    """

    EXPECTED = "a rate such as 10Mbit, 1.5Gbit, 100kbit or 512Kibit"
    MIN = 1
    MAX = 2**63 - 1
    UNITS: ClassVar[dict[str, int]] = {
        "bit": 1,
        **{p.lower() + "bit": f for p, f in _SI},
        **{p.lower() + "bit": f for p, f in _BIN},
    }
    PRINT_UNITS: ClassVar[list[tuple[str, int]]] = [(p + "bit", f) for p, f in [*_SI, *_BIN]] + [
        ("bit", 1)
    ]

    @classmethod
    def _factor(cls, suffix: str, text: object) -> Decimal:
        if suffix.endswith("/s"):
            suffix = suffix[:-2]
        if suffix.endswith("bps"):
            raise UnitError(
                text,
                cls.EXPECTED,
                "'bps' is ambiguous (tc reads it as bytes per second); write bit, e.g. 10Mbit",
            )
        return super()._factor(suffix, text)

    @property
    def bits_per_second(self) -> int:
        return self.value

    @property
    def bytes_per_second(self) -> float:
        return self.value / 8


class ByteSize(_Scalar):
    """A size in bytes. Accepts ``B``, ``KB``, ``MB``, ``GB`` (SI) and ``KiB``, ``MiB``, ``GiB``."""

    EXPECTED = "a size such as 1500B, 64KB or 32KiB"
    MIN = 0
    MAX = 2**32 - 1
    UNITS: ClassVar[dict[str, int]] = {
        "b": 1,
        **{p.lower() + "b": f for p, f in _SI[1:]},
        **{p.lower() + "b": f for p, f in _BIN[1:]},
    }
    PRINT_UNITS: ClassVar[list[tuple[str, int]]] = [
        (p + "B", f) for p, f in [*_SI[1:], *_BIN[1:]]
    ] + [("B", 1)]


class Duration(_Scalar):
    """A time span in nanoseconds. Accepts ``ns``, ``us`` (or ``µs``), ``ms``, ``s``."""

    EXPECTED = "a duration such as 250us, 50ms or 1.5s"
    MIN = 0
    MAX = (2**32 - 1) * 1000
    UNITS: ClassVar[dict[str, int]] = {
        "ns": 1,
        "us": 1000,
        "µs": 1000,
        "ms": 10**6,
        "s": 10**9,
    }
    PRINT_UNITS: ClassVar[list[tuple[str, int]]] = [
        ("s", 10**9),
        ("ms", 10**6),
        ("us", 1000),
        ("ns", 1),
    ]

    @classmethod
    def _print(cls, value: int) -> str:
        # Prefer the largest unit that is exact: "1500ms" is shorter than
        # "1.5s" would be but "1s" reads better than "1000ms".
        for name, factor in cls.PRINT_UNITS:
            if value % factor == 0:
                return f"{value // factor}{name}"
        return f"{value}ns"  # pragma: no cover - ns always divides

    @property
    def seconds(self) -> float:
        return self.value / 1e9

    @property
    def microseconds(self) -> float:
        return self.value / 1e3


class Probability(_Scalar):
    """A probability, kept in parts per billion. Accepts ``0.5%`` or a fraction ``0.005``."""

    EXPECTED = "a probability such as 0.5% or 0.005, between 0% and 100%"
    MIN = 0
    MAX = 10**9
    BARE_NUMBERS = True
    UNITS: ClassVar[dict[str, int]] = {"%": 10**7, "": 10**9}

    @classmethod
    def _print(cls, value: int) -> str:
        percent = Decimal(value) / Decimal(10**7)
        text = format(percent.normalize(), "f")
        return f"{text}%"

    @property
    def fraction(self) -> float:
        return self.value / 1e9


class QueueLimit:
    """A queue limit in bytes (``64KB``) or in packets (``100pkt``).

    Kept as ``(amount, unit)`` with unit ``"bytes"`` or ``"packets"``.
    """

    EXPECTED = "a queue limit such as 64KB (bytes) or 100pkt (packets)"
    _PACKETS = re.compile(r"\s*([0-9]+)\s*(p|pkt|pkts|packet|packets)\s*", re.IGNORECASE)
    MAX = 2**32 - 1

    __slots__ = ("amount", "unit")

    def __init__(self, amount: int, unit: str) -> None:
        if unit not in ("bytes", "packets"):
            raise ValueError(f"QueueLimit unit is bytes or packets, got {unit!r}")
        if not 1 <= amount <= self.MAX:
            raise UnitError(str(amount), self.EXPECTED, f"between 1 and {self.MAX}")
        self.amount = amount
        self.unit = unit

    @classmethod
    def parse(cls, text: object) -> QueueLimit:
        if isinstance(text, QueueLimit):
            return text
        if isinstance(text, str):
            check_length(text, cls.EXPECTED)
            m = cls._PACKETS.fullmatch(text)
            if m:
                if not 1 <= int(m.group(1)) <= cls.MAX:
                    raise UnitError(text, cls.EXPECTED, f"between 1 and {cls.MAX} packets")
                return cls(int(m.group(1)), "packets")
        try:
            size = ByteSize.parse(text)
        except UnitError as exc:
            raise UnitError(
                text,
                cls.EXPECTED,
                exc.expected.removeprefix(ByteSize.EXPECTED).strip(" ()") or None,
            ) from None
        return cls(size.value, "bytes")

    @classmethod
    def of_bytes(cls, amount: int) -> QueueLimit:
        return cls(amount, "bytes")

    def __str__(self) -> str:
        return f"{self.amount}pkt" if self.unit == "packets" else str(ByteSize(self.amount))

    def __repr__(self) -> str:
        return f"QueueLimit({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QueueLimit) and (self.amount, self.unit) == (
            other.amount,
            other.unit,
        )

    def __hash__(self) -> int:
        return hash((self.amount, self.unit))


# Whole-string patterns (used with fullmatch: "$" would let a final newline through), on
# text already bounded by check_length.
_MAC = re.compile(r"[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}", re.IGNORECASE)
_MAC_IN_RANGE = r"[0-9a-f]{2}(?:[:-][0-9a-f]{2}){5}"
_MAC_RANGE = re.compile(rf"\s*({_MAC_IN_RANGE})\s*-\s*({_MAC_IN_RANGE})\s*", re.IGNORECASE)
_MAC_PREFIX = re.compile(rf"\s*({_MAC_IN_RANGE})\s*/\s*([0-9]+)\s*", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class MacAddress:
    """A 48-bit MAC address. Accepts ``02:00:00:00:00:01`` or ``02-00-00-00-00-01``."""

    value: int
    EXPECTED: ClassVar[str] = "a MAC address such as 02:00:00:00:00:01"

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise TypeError(f"MacAddress holds an int, got {self.value!r}")
        if not 0 <= self.value < 2**48:
            raise UnitError(hex(self.value), self.EXPECTED, "outside 48 bits")

    @classmethod
    def parse(cls, text: object) -> MacAddress:
        if isinstance(text, MacAddress):
            return text
        if not isinstance(text, str):
            raise UnitError(text, cls.EXPECTED)
        check_length(text, cls.EXPECTED)
        if not _MAC.fullmatch(text.strip()):
            raise UnitError(text, cls.EXPECTED)
        return cls(int(re.sub(r"[:-]", "", text.strip()), 16))

    @property
    def is_multicast(self) -> bool:
        return bool((self.value >> 40) & 0x01)

    @property
    def is_local(self) -> bool:
        return bool((self.value >> 40) & 0x02)

    def __str__(self) -> str:
        raw = f"{self.value:012x}"
        return ":".join(raw[i : i + 2] for i in range(0, 12, 2))

    def __repr__(self) -> str:
        return f"MacAddress({str(self)!r})"


@dataclass(frozen=True, order=True)
class MacRange:
    """An inclusive range of locally administered unicast MAC addresses.

    Accepts ``first-last`` or ``first/prefix-length``. Every address in the
    range shares the first octet, which must have the local bit set and the
    multicast bit clear, so the whole range is local unicast.
    """

    first: MacAddress
    last: MacAddress
    EXPECTED: ClassVar[str] = (
        "a locally administered unicast MAC range such as "
        "02:00:00:00:00:00-02:00:00:00:ff:ff or 02:00:00:10:00:00/32"
    )

    def __post_init__(self) -> None:
        text = f"{self.first}-{self.last}"
        if self.first > self.last:
            raise UnitError(text, self.EXPECTED, "first address is after the last")
        if (self.first.value >> 40) != (self.last.value >> 40):
            raise UnitError(text, self.EXPECTED, "first octet must be the same at both ends")
        if self.first.is_multicast:
            raise UnitError(text, self.EXPECTED, "multicast bit set in the first octet")
        if not self.first.is_local:
            raise UnitError(
                text, self.EXPECTED, "not locally administered (set bit 0x02 of the first octet)"
            )

    @classmethod
    def parse(cls, text: object) -> MacRange:
        if isinstance(text, MacRange):
            return text
        if not isinstance(text, str):
            raise UnitError(text, cls.EXPECTED)
        check_length(text, cls.EXPECTED)
        m = _MAC_RANGE.fullmatch(text)
        if m:
            return cls(MacAddress.parse(m.group(1)), MacAddress.parse(m.group(2)))
        m = _MAC_PREFIX.fullmatch(text)
        if m:
            start = MacAddress.parse(m.group(1))
            length = int(m.group(2))
            if not 8 <= length <= 48:
                raise UnitError(text, cls.EXPECTED, "prefix length must be 8..48")
            host_bits = 48 - length
            if start.value & ((1 << host_bits) - 1):
                raise UnitError(text, cls.EXPECTED, "address has bits set beyond the prefix")
            return cls(start, MacAddress(start.value | ((1 << host_bits) - 1)))
        raise UnitError(text, cls.EXPECTED)

    @property
    def size(self) -> int:
        return self.last.value - self.first.value + 1

    def __contains__(self, mac: object) -> bool:
        return isinstance(mac, MacAddress) and self.first <= mac <= self.last

    def overlaps(self, other: MacRange) -> bool:
        return self.first <= other.last and other.first <= self.last

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"

    def __repr__(self) -> str:
        return f"MacRange({str(self)!r})"


_DSCP_NAMES: dict[str, int] = {
    "be": 0,
    "default": 0,
    "ef": 46,
    "va": 44,
    **{f"cs{i}": i * 8 for i in range(8)},
    **{f"af{c}{d}": c * 8 + d * 2 for c in range(1, 5) for d in range(1, 4)},
}


@dataclass(frozen=True, order=True)
class Dscp:
    """A DiffServ code point 0..63; accepts a number or a name (``ef``, ``af41``, ``cs1``)."""

    value: int
    EXPECTED: ClassVar[str] = "a DSCP value 0..63 or a name such as ef, af41, cs1"

    def __post_init__(self) -> None:
        if (
            isinstance(self.value, bool)
            or not isinstance(self.value, int)
            or not 0 <= self.value <= 63
        ):
            raise UnitError(repr(self.value), self.EXPECTED)

    @classmethod
    def parse(cls, text: object) -> Dscp:
        if isinstance(text, Dscp):
            return text
        if isinstance(text, bool):
            raise UnitError(text, cls.EXPECTED)
        if isinstance(text, int):
            if not 0 <= text <= 63:
                raise UnitError(text, cls.EXPECTED, "outside 0..63")
            return cls(text)
        if isinstance(text, str):
            check_length(text, cls.EXPECTED)
            key = text.strip().lower()
            if key in _DSCP_NAMES:
                return cls(_DSCP_NAMES[key])
            if is_ascii_digits(key):
                return cls.parse(int(key))
        raise UnitError(text, cls.EXPECTED)

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:
        return f"Dscp({self.value})"
