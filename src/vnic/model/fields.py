"""The profile's field table: every field a profile may set, once, with its parser,
its printer, its unit and its documentation (:data:`FIELDS`).

A field's *value* is typed (``"egress.rate" -> Rate(10_000_000)``) or :data:`OFF`;
:func:`parse_field` reads one from what a user wrote and :func:`dump_field` writes it
back. The CLI's ``--set``, the API, the UI's forms and ``docs/profiles.md`` all read
this table. Documents, typed profiles and the rules between fields are
:mod:`vnic.model.profile`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from vnic.errors import FieldError, InvalidInput
from vnic.model.qos import QosClass, parse_classes
from vnic.model.units import (
    MAX_TEXT,
    ByteSize,
    Dscp,
    Duration,
    MacRange,
    Probability,
    QueueLimit,
    Rate,
    UnitError,
    is_ascii_digits,
)


class _Off:
    """The marker for "remove this setting" in a layer."""

    _instance: _Off | None = None

    def __new__(cls) -> _Off:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "OFF"

    def __str__(self) -> str:
        return "off"

    def __reduce__(self) -> str:
        return "OFF"


OFF: Final = _Off()

DIRECTIONS: Final = ("egress", "ingress")
DISTRIBUTIONS: Final = ("uniform", "normal", "pareto", "paretonormal")
CONGESTION_CONTROLS: Final = (
    "bbr",
    "bic",
    "cdg",
    "cubic",
    "dctcp",
    "highspeed",
    "htcp",
    "hybla",
    "illinois",
    "lp",
    "nv",
    "reno",
    "scalable",
    "vegas",
    "veno",
    "westwood",
    "yeah",
)
ECN_MODES: Final = ("off", "on", "passive")

DEFAULT_MTU: Final = ByteSize(1500)
#: The pool VMs draw MACs from when their profile names none ("vn" = 0x76 0x6e).
DEFAULT_MAC_RANGE: Final = MacRange.parse("02:76:6e:00:00:00-02:76:6e:ff:ff:ff")
#: Shaping queue added on top of the delay line when sizing a default queue.
QUEUE_HEADROOM: Final = Duration.parse("50ms")
#: Rate assumed for sizing a default queue when a direction has delay but no rate.
QUEUE_REFERENCE_RATE: Final = Rate.parse("1Gbit")
#: Traffic one burst may carry: this much time at the direction's rate.
BURST_TIME: Final = Duration.parse("250us")


# --------------------------------------------------------------------------- loss


@dataclass(frozen=True)
class Loss:
    """Packet loss: random (``burst_length`` None) or Gilbert–Elliott.

    Gilbert–Elliott is given by what a user can observe: the mean loss
    probability and the mean length of a loss burst in packets (≥ 1). The
    two-state chain behind it (good: no loss, bad: every packet lost) has
    ``r = 1 / burst_length`` (bad→good) and ``p = mean·r / (1 − mean)``
    (good→bad); see :meth:`transition_probabilities`.
    """

    mean: Probability
    burst_length: float | None = None

    EXPECTED = (
        "a loss probability such as 0.5%, or {mean: 2%, burst_length: 4} for bursty "
        "(Gilbert-Elliott) loss with a mean burst of 4 packets"
    )

    @property
    def is_bursty(self) -> bool:
        return self.burst_length is not None

    def transition_probabilities(self) -> tuple[float, float]:
        """``(p, r)``: good→bad and bad→good per packet, for the Gilbert model."""
        length = self.burst_length or 1.0
        r = 1.0 / length
        m = self.mean.fraction
        return (m * r / (1.0 - m), r)

    @classmethod
    def parse(cls, raw: Any) -> Loss:
        if isinstance(raw, Loss):
            return raw
        if isinstance(raw, dict):
            unknown = set(raw) - {"mean", "burst_length"}
            if unknown or "mean" not in raw:
                raise UnitError(raw, cls.EXPECTED)
            mean = Probability.parse(raw["mean"])
            length = raw.get("burst_length")
            if length is None:
                return cls(mean)
            if (
                isinstance(length, bool)
                or not isinstance(length, int | float | str)
                or len(str(length) if not isinstance(length, int) else "") > MAX_TEXT
                or (isinstance(length, int) and length.bit_length() > 64)
            ):
                raise UnitError(raw, cls.EXPECTED, "burst_length is a number of packets >= 1")
            try:
                value = float(Decimal(str(length)))
            except ArithmeticError:
                raise UnitError(
                    raw, cls.EXPECTED, "burst_length is a number of packets >= 1"
                ) from None
            if not math.isfinite(value) or value < 1 or value > 1e6:
                raise UnitError(
                    raw, cls.EXPECTED, "burst_length is a number of packets from 1 to 1000000"
                )
            m = mean.fraction
            if m >= 1 or m > value / (1 + value):
                raise UnitError(
                    raw,
                    cls.EXPECTED,
                    f"mean loss {mean} is impossible with bursts of {value:g} packets",
                )
            return cls(mean, value)
        try:
            return cls(Probability.parse(raw))
        except UnitError as exc:
            raise UnitError(raw, cls.EXPECTED) from exc

    def to_document(self) -> Any:
        if self.burst_length is None:
            return str(self.mean)
        length: float | int = (
            int(self.burst_length) if self.burst_length.is_integer() else self.burst_length
        )
        return {"mean": str(self.mean), "burst_length": length}

    def __str__(self) -> str:
        if self.burst_length is None:
            return str(self.mean)
        return f"{self.mean} in bursts of {self.burst_length:g}"


# --------------------------------------------------------------------------- fields


def _choice(options: Iterable[str], what: str) -> tuple[Callable[[Any], str], str]:
    allowed = tuple(options)
    expected = f"{what}: one of {', '.join(allowed)}"

    def parse(raw: Any) -> str:
        if isinstance(raw, str) and raw.strip().lower() in allowed:
            return raw.strip().lower()
        raise UnitError(raw, expected)

    return parse, expected


_BOOL_WORDS = {
    "true": True,
    "on": True,
    "yes": True,
    "1": True,
    "false": False,
    "off": False,
    "no": False,
    "0": False,
}


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[raw.strip().lower()]
    raise UnitError(raw, "true or false")


def _parse_ecn(raw: Any) -> str:
    if raw is True:
        return "on"
    if raw is False:
        return "off"
    parse, _ = _choice(ECN_MODES, "an ECN mode")
    return parse(raw)


def _dump_str(value: Any) -> Any:
    return str(value)


def _dump_plain(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class FieldDef:
    """One settable field of a profile.

    ``off_words``: whether ``off``/``false`` in a document mean "remove" (true
    for impairments and limits) or are an ordinary value (on/off settings).
    """

    path: str
    parse: Callable[[Any], Any]
    expected: str
    doc: str
    dump: Callable[[Any], Any] = _dump_str
    off_words: bool = True
    unit: str = ""


def _direction_fields(d: str) -> list[FieldDef]:
    dist_parse, dist_expected = _choice(DISTRIBUTIONS, "a jitter distribution")
    who = "sent by the VM" if d == "egress" else "received by the VM"
    fields = [
        FieldDef(
            f"{d}.rate",
            Rate.parse,
            Rate.EXPECTED,
            f"Rate limit for traffic {who}, on the wire (Ethernet frames).",
            unit="bit/s",
        ),
        FieldDef(
            f"{d}.burst",
            ByteSize.parse,
            ByteSize.EXPECTED,
            "Bytes that may pass at line rate before the rate applies; at least the MTU. "
            "Default: the larger of two MTUs and 250 µs of traffic at the rate.",
            unit="bytes",
        ),
        FieldDef(
            f"{d}.peak",
            Rate.parse,
            Rate.EXPECTED,
            "Highest rate a burst may be sent at; at least the rate. Default: line rate.",
            unit="bit/s",
        ),
        FieldDef(
            f"{d}.queue",
            QueueLimit.parse,
            QueueLimit.EXPECTED,
            "Queue limit in bytes or packets. Default: the bandwidth-delay product, "
            "rate x (delay + jitter + 50 ms), at least 4 MTUs (1 Gbit/s is assumed when no rate is set).",
            unit="bytes|packets",
        ),
        FieldDef(
            f"{d}.delay",
            Duration.parse,
            Duration.EXPECTED,
            f"Constant one-way delay added to traffic {who}.",
            unit="ns",
        ),
        FieldDef(
            f"{d}.jitter",
            Duration.parse,
            Duration.EXPECTED,
            "Variation of the delay; at most the delay. Uniform: delay +- jitter; normal, pareto, "
            "paretonormal: standard deviation = jitter. Packet order is kept unless reorder is set.",
            unit="ns",
        ),
        FieldDef(
            f"{d}.distribution",
            dist_parse,
            dist_expected,
            "Shape of the jitter. Default: uniform. Pareto has shape 3, truncated at 4.5 times "
            "its scale (where netem's table ends); paretonormal is 1/4 normal + 3/4 pareto.",
        ),
        FieldDef(
            f"{d}.reorder",
            Probability.parse,
            Probability.EXPECTED,
            "Probability that a packet is sent at once, ahead of earlier ones still delayed "
            "(needs delay); with reorder set, jitter may reorder too. Default: 0, order kept.",
            unit="probability",
        ),
        FieldDef(
            f"{d}.loss",
            Loss.parse,
            Loss.EXPECTED,
            "Random loss probability, or {mean, burst_length} for Gilbert-Elliott bursty loss.",
            dump=lambda v: v.to_document(),
        ),
        FieldDef(
            f"{d}.duplicate",
            Probability.parse,
            Probability.EXPECTED,
            "Probability that a packet is duplicated.",
            unit="probability",
        ),
        FieldDef(
            f"{d}.corrupt",
            Probability.parse,
            Probability.EXPECTED,
            "Probability that a packet gets a bit error.",
            unit="probability",
        ),
    ]
    if d == "egress":
        fields.append(
            FieldDef(
                "egress.dscp_mark",
                Dscp.parse,
                Dscp.EXPECTED,
                "DSCP written into every packet the VM sends, on the host side.",
                dump=lambda v: v.value,
            )
        )
    return fields


def _qos_field(d: str) -> FieldDef:
    def parse(raw: Any) -> tuple[QosClass, ...]:
        classes, errors = parse_classes(raw, "")
        if errors:
            raise _NestedErrors(errors)
        return classes

    return FieldDef(
        f"qos.{d}",
        parse,
        "a list of classes {name, priority, guaranteed, ceiling, match}",
        f"QoS classes for {d} traffic, each with a guaranteed rate and a ceiling.",
        dump=lambda v: [c.to_document() for c in v],
    )


class _NestedErrors(Exception):
    """Raised by a field parser that found several problems below its own path."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("nested errors")
        self.errors = errors


SEED_EXPECTED: Final = "an integer from 0 to 9223372036854775807"


def _parse_seed(raw: Any) -> int:
    if isinstance(raw, str) and is_ascii_digits(raw.strip()):
        raw = int(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < 2**63:
        raise UnitError(raw, SEED_EXPECTED)
    return raw


_cc_parse, _cc_expected = _choice(CONGESTION_CONTROLS, "a TCP congestion control algorithm")

FIELDS: Final[dict[str, FieldDef]] = {
    f.path: f
    for f in [
        FieldDef(
            "mtu",
            ByteSize.parse,
            ByteSize.EXPECTED,
            "MTU of the vNIC. Default: 1500B.",
            unit="bytes",
        ),
        FieldDef(
            "seed",
            _parse_seed,
            SEED_EXPECTED,
            "Seed of every random choice (jitter, loss, duplication, corruption, reordering), "
            "so a run can be repeated packet for packet. Default: derived from the session and "
            "VM names and the direction.",
            dump=_dump_plain,
        ),
        FieldDef(
            "mac_range",
            MacRange.parse,
            MacRange.EXPECTED,
            "Pool the VM's MAC address is allocated from; may not overlap another profile's.",
        ),
        *_direction_fields("egress"),
        *_direction_fields("ingress"),
        _qos_field("egress"),
        _qos_field("ingress"),
        FieldDef(
            "tcp.congestion_control",
            _cc_parse,
            _cc_expected,
            "TCP congestion control inside the VM.",
            dump=_dump_plain,
        ),
        FieldDef(
            "tcp.window_scaling",
            _parse_bool,
            "true or false",
            "TCP window scaling (RFC 7323) inside the VM.",
            dump=_dump_plain,
            off_words=False,
        ),
        FieldDef(
            "tcp.sack",
            _parse_bool,
            "true or false",
            "TCP selective acknowledgements inside the VM.",
            dump=_dump_plain,
            off_words=False,
        ),
        FieldDef(
            "tcp.timestamps",
            _parse_bool,
            "true or false",
            "TCP timestamps inside the VM.",
            dump=_dump_plain,
            off_words=False,
        ),
        FieldDef(
            "tcp.ecn",
            _parse_ecn,
            "an ECN mode: one of off, on, passive",
            "Explicit congestion notification inside the VM.",
            dump=_dump_plain,
            off_words=False,
        ),
    ]
}


def is_off(raw: Any, fdef: FieldDef) -> bool:
    """Whether a raw document value means "remove this setting"."""
    if raw is None:
        return True
    if not fdef.off_words:
        return False
    if raw is False:
        return True
    return isinstance(raw, str) and raw.strip().lower() in ("off", "none", "null")


def parse_field(path: str, raw: Any) -> Any:
    """Parse one field's raw value into its type, or :data:`OFF`.

    Raises :class:`InvalidInput` naming ``path``.
    """
    fdef = FIELDS.get(path)
    if fdef is None:
        raise InvalidInput.one(path, "unknown field", "one of " + ", ".join(FIELDS))
    if is_off(raw, fdef):
        return OFF
    try:
        return fdef.parse(raw)
    except _NestedErrors as exc:
        raise InvalidInput([e.under(path) for e in exc.errors]) from None
    except (UnitError, ValueError, TypeError) as exc:
        expected = exc.expected if isinstance(exc, UnitError) else fdef.expected
        raise InvalidInput.one(path, raw, expected) from None


def dump_field(path: str, value: Any) -> Any:
    """The canonical document form of one field's typed value."""
    if value is OFF:
        return None if not FIELDS[path].off_words else "off"
    return FIELDS[path].dump(value)
