"""Unit types: parsing, refusals, canonical printing and round trips."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vnic.model.units import (
    ByteSize,
    Dscp,
    Duration,
    MacAddress,
    MacRange,
    Probability,
    QueueLimit,
    Rate,
    UnitError,
)

# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("cls", "text", "expected"),
    [
        (Rate, "10Mbit", Rate(10_000_000)),
        (Rate, "10mbit", Rate(10_000_000)),
        (Rate, "1.5Gbit", Rate(1_500_000_000)),
        (Rate, "100kbit", Rate(100_000)),
        (Rate, "512kibit", Rate(524_288)),
        (Rate, "10Mbit/s", Rate(10_000_000)),
        (ByteSize, "64KB", ByteSize(64_000)),
        (ByteSize, "32KiB", ByteSize(32 * 1024)),
        (ByteSize, "1500B", ByteSize(1500)),
        (Duration, "250us", Duration(250_000)),
        (Duration, "50ms", Duration(50_000_000)),
        (Duration, "1s", Duration(1_000_000_000)),
        (Probability, "0.5%", Probability(5_000_000)),
        (Probability, "0.005", Probability(5_000_000)),
        (Dscp, "ef", Dscp(46)),
        (Dscp, "af41", Dscp(34)),
        (Dscp, 63, Dscp(63)),
        (Dscp, "63", Dscp(63)),
        (QueueLimit, "100pkt", QueueLimit(100, "packets")),
        (QueueLimit, "64KB", QueueLimit(64_000, "bytes")),
    ],
)
def test_parse(cls: type, text: object, expected: object) -> None:
    assert cls.parse(text) == expected


def test_parse_base_values() -> None:
    assert Rate.parse("512kibit").bits_per_second == 524_288
    assert ByteSize.parse("64KB").value == 64_000
    assert ByteSize.parse("32KiB").value == 32_768
    assert Duration.parse("250us").value == 250_000
    assert Probability.parse("0.5%").value == 5_000_000
    assert Probability.parse("0.005").value == 5_000_000


@pytest.mark.parametrize(
    ("text", "first", "last"),
    [
        (
            "02:00:00:00:00:00-02:00:00:00:ff:ff",
            0x02_00_00_00_00_00,
            0x02_00_00_00_FF_FF,
        ),
        ("02:00:00:10:00:00/32", 0x02_00_00_10_00_00, 0x02_00_00_10_FF_FF),
    ],
)
def test_parse_mac_range(text: str, first: int, last: int) -> None:
    r = MacRange.parse(text)
    assert r.first == MacAddress(first)
    assert r.last == MacAddress(last)
    assert r.size == last - first + 1
    assert MacAddress(first) in r
    assert MacAddress(last) in r
    assert MacAddress(last + 1) not in r


def test_mac_address_parse() -> None:
    assert MacAddress.parse("02:00:00:00:00:01") == MacAddress(0x020000000001)
    assert MacAddress.parse("02-00-00-00-00-01") == MacAddress(0x020000000001)
    assert str(MacAddress(0x0A0B0C0D0E0F)) == "0a:0b:0c:0d:0e:0f"


def test_queue_limit_units() -> None:
    q = QueueLimit.parse("100pkt")
    assert (q.amount, q.unit) == (100, "packets")
    q = QueueLimit.parse("64KB")
    assert (q.amount, q.unit) == (64_000, "bytes")
    assert QueueLimit.parse("100pkt") != QueueLimit.parse("100B")


# --------------------------------------------------------------------------- refusals


def _refused(cls: type, text: object) -> UnitError:
    with pytest.raises(UnitError) as info:
        cls.parse(text)
    exc = info.value
    shown = text if isinstance(text, str) else repr(text)
    assert shown in exc.value
    assert exc.expected
    assert shown in str(exc)
    return exc


@pytest.mark.parametrize(
    ("cls", "text"),
    [
        (Rate, "-5Mbit"),
        (ByteSize, "-1B"),
        (Duration, "-1ms"),
        (Probability, "-0.5%"),
        (Rate, "10furlongs"),
        (ByteSize, "10furlongs"),
        (Duration, "10furlongs"),
        (Probability, "10furlongs"),
        (QueueLimit, "10furlongs"),
        (Rate, "nan"),
        (ByteSize, "nan"),
        (Duration, "nan"),
        (Probability, "nan"),
        (Rate, float("nan")),
        (Duration, float("nan")),
        (Probability, float("nan")),
        (Rate, float("inf")),
        (Rate, "1000"),
        (ByteSize, "1000"),
        (Duration, "1000"),
        (Rate, f"{2**63}bit"),
        (Rate, "10000000Tbit"),
        (ByteSize, f"{2**32}B"),
        (ByteSize, "5GB"),
        (Duration, f"{2**32}us"),
        (Duration, "4294967.296s"),
        (Probability, "101%"),
        (Probability, "1.01"),
        (Rate, "10mbps"),
        (Rate, "0.4bit"),
        (MacRange, "03:00:00:00:00:00-03:00:00:00:00:ff"),
        (MacRange, "00:11:22:00:00:00-00:11:22:00:00:ff"),
        (MacRange, "02:00:00:00:00:00-06:00:00:00:00:ff"),
        (MacRange, "02:00:00:00:00:ff-02:00:00:00:00:00"),
        (MacRange, "02:00:00:10:00:01/32"),
        (MacAddress, "02:00:00:00:00"),
        (Dscp, 64),
        (Dscp, "64"),
        (Dscp, "af44"),
        (Dscp, True),
    ],
)
def test_refused(cls: type, text: object) -> None:
    _refused(cls, text)


def test_boundaries_accepted() -> None:
    assert Rate.parse(f"{2**63 - 1}bit").value == 2**63 - 1
    assert ByteSize.parse(f"{2**32 - 1}B").value == 2**32 - 1
    assert Duration.parse(f"{2**32 - 1}us").value == (2**32 - 1) * 1000
    assert Probability.parse("100%").value == 10**9
    assert Probability.parse("1").value == 10**9
    assert Dscp.parse(0) == Dscp(0)


def test_bps_refused_mentions_bytes() -> None:
    exc = _refused(Rate, "10mbps")
    assert "bytes" in exc.expected
    assert "bytes" in str(exc)


def test_missing_unit_says_so() -> None:
    for cls in (Rate, ByteSize, Duration):
        assert "unit is required" in _refused(cls, "1000").expected


def test_nan_float_value_text() -> None:
    exc = _refused(Rate, float("nan"))
    assert exc.value == "nan"
    assert "finite" in exc.expected


def test_mac_range_reasons() -> None:
    assert "multicast" in _refused(MacRange, "03:00:00:00:00:00-03:00:00:00:00:ff").expected
    assert "locally administered" in (
        _refused(MacRange, "00:11:22:00:00:00-00:11:22:00:00:ff").expected
    )
    assert "first octet" in _refused(MacRange, "02:00:00:00:00:00-06:00:00:00:00:ff").expected


def test_constructor_range_checks() -> None:
    with pytest.raises(UnitError):
        Rate(0)
    with pytest.raises(UnitError):
        ByteSize(2**32)
    with pytest.raises(UnitError):
        Dscp(64)
    with pytest.raises(TypeError):
        Rate(1.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- ordering / equality


def test_ordering_and_equality() -> None:
    assert Rate.parse("1Mbit") < Rate.parse("2Mbit")
    assert Rate.parse("1000kbit") == Rate.parse("1Mbit")
    assert Rate(8) != Duration(8)
    assert ByteSize(8) != Rate(8)
    assert hash(Rate.parse("1Mbit")) == hash(Rate(1_000_000))
    assert Duration.parse("1s") > Duration.parse("999ms")


def test_parse_returns_instance_as_is() -> None:
    r = Rate(5)
    assert Rate.parse(r) is r


# --------------------------------------------------------------------------- canonical printing


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Rate(10_000_000), "10Mbit"),
        (Rate(524_288), "512Kibit"),
        (ByteSize(64_000), "64kB"),
        (ByteSize(1500), "1500B"),
        (Duration(1_000_000_000), "1s"),
        (Duration(250_000), "250us"),
        (Probability(5_000_000), "0.5%"),
        (Probability(10**9), "100%"),
        (Probability(0), "0%"),
        (QueueLimit(100, "packets"), "100pkt"),
    ],
)
def test_canonical_text(value: object, text: str) -> None:
    assert str(value) == text


# --------------------------------------------------------------------------- properties

_LOCAL_UNICAST_OCTETS = st.integers(0, 63).map(lambda k: k * 4 + 2)


@settings(deadline=None)
@given(st.integers(Rate.MIN, Rate.MAX))
def test_rate_round_trip(n: int) -> None:
    x = Rate(n)
    assert Rate.parse(str(x)) == x


@settings(deadline=None)
@given(st.integers(ByteSize.MIN, ByteSize.MAX))
def test_byte_size_round_trip(n: int) -> None:
    x = ByteSize(n)
    assert ByteSize.parse(str(x)) == x


@settings(deadline=None)
@given(st.integers(Duration.MIN, Duration.MAX))
def test_duration_round_trip(n: int) -> None:
    x = Duration(n)
    assert Duration.parse(str(x)) == x


@settings(deadline=None)
@given(st.integers(Probability.MIN, Probability.MAX))
def test_probability_round_trip(n: int) -> None:
    x = Probability(n)
    assert Probability.parse(str(x)) == x


@settings(deadline=None)
@given(st.integers(1, QueueLimit.MAX), st.sampled_from(["bytes", "packets"]))
def test_queue_limit_round_trip(n: int, unit: str) -> None:
    x = QueueLimit(n, unit)
    assert QueueLimit.parse(str(x)) == x


@settings(deadline=None)
@given(st.integers(0, 2**48 - 1))
def test_mac_address_round_trip(n: int) -> None:
    x = MacAddress(n)
    assert MacAddress.parse(str(x)) == x


@settings(deadline=None)
@given(
    _LOCAL_UNICAST_OCTETS,
    st.lists(st.integers(0, 2**40 - 1), min_size=2, max_size=2).map(sorted),
)
def test_mac_range_round_trip(octet: int, tails: list[int]) -> None:
    x = MacRange(MacAddress(octet << 40 | tails[0]), MacAddress(octet << 40 | tails[1]))
    assert MacRange.parse(str(x)) == x


@settings(deadline=None)
@given(st.integers(0, 63))
def test_dscp_round_trip(n: int) -> None:
    x = Dscp(n)
    assert Dscp.parse(str(x)) == x


def _random_case(draw: st.DrawFn, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if f else c.lower() for c, f in zip(text, flips, strict=True))


@st.composite
def _rate_texts(draw: st.DrawFn) -> tuple[str, int]:
    suffix, factor = draw(st.sampled_from(sorted(Rate.UNITS.items())))
    n = draw(st.integers(1, Rate.MAX // factor))
    per_second = draw(st.sampled_from(["", "/s"]))
    return f"{n}{_random_case(draw, suffix + per_second)}", n * factor


@settings(deadline=None)
@given(_rate_texts())
def test_rate_suffix_case_insensitive(case: tuple[str, int]) -> None:
    text, bits = case
    assert Rate.parse(text) == Rate(bits)
    assert Rate.parse(text) == Rate.parse(text.lower())


@settings(deadline=None)
@given(st.integers(0, 10**9))
def test_probability_percent_and_fraction_agree(ppb: int) -> None:
    # ppb / 10**7 percent == ppb / 10**9 as a fraction
    percent = f"{Decimal(ppb).scaleb(-7):f}%"
    fraction = f"{Decimal(ppb).scaleb(-9):f}"
    assert Probability.parse(percent) == Probability.parse(fraction) == Probability(ppb)
    assert math.isclose(Probability.parse(fraction).fraction, ppb / 10**9)


# --------------------------------------------------------------------------- known source bugs


def test_small_float_probability_accepted() -> None:
    assert Probability.parse(0.00001) == Probability(10_000)


def test_dscp_superscript_digit_is_unit_error() -> None:
    with pytest.raises(UnitError):
        Dscp.parse("²")
    with pytest.raises(UnitError):
        Dscp.parse("٣")


def test_queue_limit_error_names_the_whole_input() -> None:
    with pytest.raises(UnitError) as exc:
        QueueLimit.parse("0pkt")
    assert exc.value.value == "0pkt"
