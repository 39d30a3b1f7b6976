"""Profiles: the named set of characteristics a vNIC gets.

Three shapes of a profile live here:

* a **document** — what a user writes (YAML/JSON, nested, every field
  optional, unknown keys refused);
* **values** — the flat mapping ``field path -> typed value | OFF`` that
  resolution layers are made of (``"egress.rate" -> Rate(10_000_000)``);
* a :class:`Profile` — the typed, validated, complete effective profile that a
  plan is compiled from.

Directions are from the VM's point of view: ``egress`` is what the VM sends,
``ingress`` what it receives. Every field is listed once, in :data:`FIELDS`,
with its parser, its printer and its documentation; the CLI's ``--set``, the
API and the docs all read that table.

Unset fields inherit from the layer below; ``off`` (or ``null``) removes an
impairment that a lower layer set; a value replaces. For on/off fields
(``tcp.window_scaling``) ``off`` is the value *false* and only ``null``
removes the setting.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

from vnic.errors import FieldError, InvalidInput, show_value
from vnic.model.limits import LABELS_MAX, check_count
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

#: Top-level document keys that are not resolvable fields.
META_KEYS: Final = ("name", "description", "labels")
_SECTIONS: Final = {
    "egress": "egress",
    "ingress": "ingress",
    "qos": "qos",
    "tcp": "tcp",
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
NAME_EXPECTED: Final = (
    "a name of 1-64 characters: letters, digits, '.', '_', '-', starting with a letter or digit"
)


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


# --------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class ProfileSpec:
    """A profile as written: name, description, labels and the fields it sets."""

    name: str
    values: Mapping[str, Any]
    description: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name}
        if self.description:
            doc["description"] = self.description
        if self.labels:
            doc["labels"] = dict(sorted(self.labels.items()))
        doc.update(values_to_document(self.values))
        return doc


def values_to_document(values: Mapping[str, Any]) -> dict[str, Any]:
    """Nest a flat ``path -> typed value`` mapping into a canonical document (field order of FIELDS)."""
    doc: dict[str, Any] = {}
    for path in FIELDS:
        if path not in values:
            continue
        dumped = dump_field(path, values[path])
        head, _, tail = path.partition(".")
        if tail:
            doc.setdefault(head, {})[tail] = dumped
        else:
            doc[head] = dumped
    return doc


def document_to_values(doc: Mapping[str, Any], errors: list[FieldError]) -> dict[str, Any]:
    """Flatten the field part of a document; problems go to ``errors``. Meta keys are skipped."""
    values: dict[str, Any] = {}
    sections = {p.partition(".")[0] for p in FIELDS if "." in p}
    top_fields = {p for p in FIELDS if "." not in p}
    for key, raw in doc.items():
        if key in META_KEYS:
            continue
        if key in top_fields:
            _put(values, errors, key, raw)
        elif key in sections:
            if raw is None:
                raw = {}
            if not isinstance(raw, dict):
                errors.append(FieldError(key, show_value(raw), f"a mapping of {key} fields"))
                continue
            for sub, sub_raw in raw.items():
                path = f"{key}.{sub}"
                if path not in FIELDS:
                    known = sorted(p.partition(".")[2] for p in FIELDS if p.startswith(key + "."))
                    errors.append(FieldError(path, "unknown key", f"one of {', '.join(known)}"))
                    continue
                _put(values, errors, path, sub_raw)
        else:
            known = sorted([*META_KEYS, *top_fields, *sections])
            errors.append(FieldError(str(key), "unknown key", f"one of {', '.join(known)}"))
    return values


def _put(values: dict[str, Any], errors: list[FieldError], path: str, raw: Any) -> None:
    try:
        values[path] = parse_field(path, raw)
    except InvalidInput as exc:
        errors.extend(exc.errors)


def parse_name(value: Any, path: str = "name") -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidInput.one(path, value, NAME_EXPECTED)
    return value


def parse_labels(value: Any, path: str = "labels") -> dict[str, str]:
    """Labels: a mapping of short keys to text values."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput.one(path, value, "a mapping of label keys to values")
    check_count(value, path, LABELS_MAX, "labels")
    errors: list[FieldError] = []
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not _LABEL_KEY.fullmatch(k):
            errors.append(
                FieldError(f"{path}.{k}", show_value(k), "a label key of letters, digits, . _ / -")
            )
        elif isinstance(v, bool) or not isinstance(v, str | int | float) or len(str(v)) > 200:
            errors.append(
                FieldError(f"{path}.{k}", show_value(v), "a text value of at most 200 characters")
            )
        else:
            out[k] = str(v)
    if errors:
        raise InvalidInput(errors)
    return out


def parse_profile_document(doc: Any) -> ProfileSpec:
    """Read one profile document; every problem is collected and raised together.

    Checks the cross-field rules that the document alone decides (see
    :func:`check_rules` with ``complete=False``).
    """
    if not isinstance(doc, dict):
        raise InvalidInput.one("", doc, "a profile: a mapping with name and profile fields")
    errors: list[FieldError] = []
    name = ""
    try:
        name = parse_name(doc.get("name"))
    except InvalidInput as exc:
        errors.extend(exc.errors)
    description = doc.get("description", "") or ""
    if not isinstance(description, str) or len(description) > 1000:
        errors.append(
            FieldError("description", show_value(description), "text of at most 1000 characters")
        )
        description = ""
    labels: dict[str, str] = {}
    try:
        labels = parse_labels(doc.get("labels"))
    except InvalidInput as exc:
        errors.extend(exc.errors)
    values = document_to_values(doc, errors)
    if not errors:
        errors.extend(check_rules(values, complete=False))
    if errors:
        raise InvalidInput(errors)
    return ProfileSpec(name=name, values=values, description=description, labels=labels)


def parse_patch(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Read a per-field patch given as a nested document (``{egress: {rate: 5Mbit}}``)."""
    errors: list[FieldError] = []
    meta = [k for k in doc if k in META_KEYS]
    for k in meta:
        errors.append(FieldError(k, "not a profile field", "profile fields only in a patch"))
    values = document_to_values(doc, errors)
    if not errors:
        errors.extend(check_rules(values, complete=False))
    if errors:
        raise InvalidInput(errors)
    return values


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """Read ``FIELD=VALUE`` pairs (CLI ``--set``). VALUE is read as YAML (so lists and
    ``{mean: 2%, burst_length: 4}`` work); ``off`` removes, ``null`` removes on/off fields."""
    from vnic.model.loading import DocumentError, load_yaml

    errors: list[FieldError] = []
    values: dict[str, Any] = {}
    for item in items:
        path, eq, text = item.partition("=")
        path = path.strip()
        if not eq or not path:
            errors.append(
                FieldError("--set", show_value(item), "FIELD=VALUE, e.g. egress.rate=10Mbit")
            )
            continue
        try:
            raw = load_yaml(text) if text.strip() else None
        except DocumentError:
            raw = text
        if isinstance(raw, str | int | float) and not isinstance(raw, bool):
            # Keep scalars as the user typed them: YAML would read "1.5" as a float
            # and "0x10" as an int; the field parsers want the text.
            raw = text.strip()
        if isinstance(raw, bool) and text.strip().lower() in (
            "off",
            "no",
            "false",
            "on",
            "yes",
            "true",
        ):
            raw = text.strip()
        _put(values, errors, path, raw)
    if not errors:
        errors.extend(check_rules(values, complete=False))
    if errors:
        raise InvalidInput(errors)
    return values


# --------------------------------------------------------------------------- typed profile


@dataclass(frozen=True)
class Direction:
    """Everything one direction of a vNIC gets. None = not limited / no impairment."""

    rate: Rate | None = None
    burst: ByteSize | None = None
    peak: Rate | None = None
    queue: QueueLimit | None = None
    delay: Duration | None = None
    jitter: Duration | None = None
    distribution: str | None = None
    reorder: Probability | None = None
    loss: Loss | None = None
    duplicate: Probability | None = None
    corrupt: Probability | None = None
    dscp_mark: Dscp | None = None

    @property
    def has_delay(self) -> bool:
        return bool((self.delay and self.delay.value) or (self.jitter and self.jitter.value))

    @property
    def has_loss(self) -> bool:
        return any(
            p is not None and p.value
            for p in (
                self.loss.mean if self.loss else None,
                self.duplicate,
                self.corrupt,
                self.reorder,
            )
        )


@dataclass(frozen=True)
class Qos:
    egress: tuple[QosClass, ...] = ()
    ingress: tuple[QosClass, ...] = ()


@dataclass(frozen=True)
class Tcp:
    """TCP settings applied inside the VM; None = the kernel's default."""

    congestion_control: str | None = None
    window_scaling: bool | None = None
    sack: bool | None = None
    timestamps: bool | None = None
    ecn: str | None = None


@dataclass(frozen=True)
class Profile:
    """A complete, validated effective profile."""

    mtu: ByteSize = DEFAULT_MTU
    mac_range: MacRange = DEFAULT_MAC_RANGE
    seed: int | None = None
    egress: Direction = field(default_factory=Direction)
    ingress: Direction = field(default_factory=Direction)
    qos: Qos = field(default_factory=Qos)
    tcp: Tcp = field(default_factory=Tcp)

    def direction(self, name: str) -> Direction:
        if name not in DIRECTIONS:
            raise ValueError(f"direction is egress or ingress, got {name!r}")
        return self.egress if name == "egress" else self.ingress

    def classes(self, name: str) -> tuple[QosClass, ...]:
        return self.qos.egress if name == "egress" else self.qos.ingress


BUILTIN_VALUES: Final[Mapping[str, Any]] = {"mtu": DEFAULT_MTU, "mac_range": DEFAULT_MAC_RANGE}


def build_profile(values: Mapping[str, Any]) -> Profile:
    """Make a :class:`Profile` from complete effective values (OFF and missing = None)."""
    groups: dict[str, dict[str, Any]] = {"egress": {}, "ingress": {}, "qos": {}, "tcp": {}}
    top: dict[str, Any] = {}
    for path, value in values.items():
        if value is OFF:
            continue
        head, _, tail = path.partition(".")
        if tail:
            groups[head][tail] = value
        else:
            top[head] = value
    return Profile(
        mtu=top.get("mtu", DEFAULT_MTU),
        mac_range=top.get("mac_range", DEFAULT_MAC_RANGE),
        seed=top.get("seed"),
        egress=Direction(**groups["egress"]),
        ingress=Direction(**groups["ingress"]),
        qos=Qos(**groups["qos"]),
        tcp=Tcp(**groups["tcp"]),
    )


# --------------------------------------------------------------------------- rules


def _get(values: Mapping[str, Any], path: str) -> Any:
    value = values.get(path)
    return None if value is OFF else value


def check_rules(values: Mapping[str, Any], *, complete: bool) -> list[FieldError]:
    """Cross-field rules. Returns every violation, keyed by the field to fix.

    With ``complete=False`` (a profile document or patch) a rule is checked only
    when the document itself sets the fields it relates, the MTU defaulting to
    1500B. With ``complete=True`` (an effective profile) a missing field is
    unset, so, for example, QoS classes without a direction rate are refused.
    """
    errors: list[FieldError] = []
    mtu = _get(values, "mtu") or DEFAULT_MTU
    for d in DIRECTIONS:
        rate: Rate | None = _get(values, f"{d}.rate")
        burst: ByteSize | None = _get(values, f"{d}.burst")
        peak: Rate | None = _get(values, f"{d}.peak")
        queue: QueueLimit | None = _get(values, f"{d}.queue")
        delay: Duration | None = _get(values, f"{d}.delay")
        jitter: Duration | None = _get(values, f"{d}.jitter")
        reorder: Probability | None = _get(values, f"{d}.reorder")
        if burst is not None and burst < mtu:
            errors.append(FieldError(f"{d}.burst", str(burst), f"at least the MTU {mtu}"))
        if peak is not None:
            if rate is not None and peak < rate:
                errors.append(FieldError(f"{d}.peak", str(peak), f"at least {d}.rate {rate}"))
            elif rate is None and complete:
                errors.append(FieldError(f"{d}.peak", str(peak), f"a {d}.rate to go with it"))
        if queue is not None and queue.unit == "bytes" and queue.amount < mtu.value:
            errors.append(FieldError(f"{d}.queue", str(queue), f"at least the MTU {mtu}"))
        if jitter is not None and jitter.value and (delay is not None or complete):
            limit = delay or Duration(0)
            if jitter > limit:
                errors.append(
                    FieldError(f"{d}.jitter", str(jitter), f"at most {d}.delay ({limit})")
                )
        if reorder is not None and reorder.value and complete and not (delay and delay.value):
            errors.append(
                FieldError(f"{d}.reorder", str(reorder), f"a {d}.delay to reorder against")
            )
        errors.extend(_check_classes(values, d, rate, complete))
    return errors


def _check_classes(
    values: Mapping[str, Any], d: str, rate: Rate | None, complete: bool
) -> list[FieldError]:
    classes: tuple[QosClass, ...] | None = _get(values, f"qos.{d}")
    if not classes:
        return []
    errors: list[FieldError] = []
    if rate is None:
        if complete:
            errors.append(
                FieldError(f"qos.{d}", f"{len(classes)} classes", f"a {d}.rate to share out")
            )
        return errors
    for i, cls in enumerate(classes):
        here = f"qos.{d}[{i}]"
        if cls.ceiling is not None and cls.ceiling > rate:
            errors.append(
                FieldError(f"{here}.ceiling", str(cls.ceiling), f"at most {d}.rate {rate}")
            )
        if cls.guaranteed > rate:
            errors.append(
                FieldError(f"{here}.guaranteed", str(cls.guaranteed), f"at most {d}.rate {rate}")
            )
    total = sum(c.guaranteed.value for c in classes)
    if total > rate.value:
        errors.append(
            FieldError(
                f"qos.{d}",
                f"guarantees adding up to {Rate(total)}",
                f"a sum of at most {d}.rate {rate}",
            )
        )
    return errors


# --------------------------------------------------------------------------- derived defaults


def derived_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults computed from other fields, for the fields the layers left unset.

    * ``burst`` = max(2 × MTU, :data:`BURST_TIME` of traffic at the rate), for a rate;
    * ``queue`` = max(4 × MTU, rate × (delay + jitter + :data:`QUEUE_HEADROOM`)) bytes,
      for a direction with a rate or a delay (rate :data:`QUEUE_REFERENCE_RATE`
      when unset), capped at the largest queue the kernel takes;
    * ``distribution`` = uniform, for a direction with jitter.
    """
    out: dict[str, Any] = {}
    mtu: ByteSize = _get(values, "mtu") or DEFAULT_MTU
    for d in DIRECTIONS:
        rate: Rate | None = _get(values, f"{d}.rate")
        delay: Duration = _get(values, f"{d}.delay") or Duration(0)
        jitter: Duration = _get(values, f"{d}.jitter") or Duration(0)
        if rate is not None and _get(values, f"{d}.burst") is None:
            one_burst = math.ceil(rate.value * BURST_TIME.value / 8e9)
            out[f"{d}.burst"] = ByteSize(min(ByteSize.MAX, max(2 * mtu.value, one_burst)))
        if _get(values, f"{d}.queue") is None and (rate is not None or delay.value or jitter.value):
            ref = rate or QUEUE_REFERENCE_RATE
            hold = delay.value + jitter.value + QUEUE_HEADROOM.value
            size = math.ceil(ref.value * hold / 8e9)
            out[f"{d}.queue"] = QueueLimit.of_bytes(min(QueueLimit.MAX, max(4 * mtu.value, size)))
        if jitter.value and _get(values, f"{d}.distribution") is None:
            out[f"{d}.distribution"] = "uniform"
    return out
