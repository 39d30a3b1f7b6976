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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from vnic.errors import FieldError, InvalidInput, show_value
from vnic.model.fields import (
    BURST_TIME,
    DEFAULT_MAC_RANGE,
    DEFAULT_MTU,
    DIRECTIONS,
    FIELDS,
    OFF,
    QUEUE_HEADROOM,
    QUEUE_REFERENCE_RATE,
    Loss,
    dump_field,
    parse_field,
)
from vnic.model.limits import LABELS_MAX, check_count
from vnic.model.qos import QosClass
from vnic.model.units import (
    ByteSize,
    Dscp,
    Duration,
    MacRange,
    Probability,
    QueueLimit,
    Rate,
)

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
