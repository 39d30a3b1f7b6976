"""Threshold rules: "when this metric stays above (below) that value for so long, do this".

A rule belongs to a session's controller settings; ``vms`` (a glob of VM
names) and ``profile`` (only vNICs whose effective profile is built from that
profile) narrow it to some VMs. A rule watches each vNIC of those VMs on its own:
``nic`` (a vNIC name or a glob of them, ``eth1``, ``eth*``) and ``network`` (a
network of the session) say which; a rule naming neither watches ``eth0`` only,
as rules did before VMs had several vNICs. Documents look like::

    name: boost-when-busy
    vms: "web-*"
    nic: "eth*"
    network: data
    metric: egress.utilisation
    above: 0.9
    for: 5s
    hysteresis: 0.1
    cooldown: 30s
    action:
      scale: {field: egress.rate, factor: 2, floor: 1Mbit, ceiling: 100Mbit}
    expires: 10m
    revert: true

Metrics and their units (a threshold and a hysteresis are in the metric's unit):

====================== ====================================================
``egress.rate``,       bit/s, as a rate (``10Mbit``); ``0`` allowed
``ingress.rate``
``egress.utilisation``, the measured rate as a fraction of the profile rate:
``ingress.utilisation`` a number (``0.9``) or a percentage (``90%``); may exceed 1
``drops``              packets per second, all causes, a number
``latency``            seconds, as a duration (``5ms``); ``0`` allowed
====================== ====================================================

Exactly one action: ``scale`` one numeric field by a factor, clamped to
``[floor, ceiling]``; ``set`` some fields; or switch to a named ``profile``
(the caller resolves the name). :func:`parse_rule` reads a document and
:meth:`Rule.to_document` writes the canonical one back
(``parse_rule(r.to_document()) == r``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from typing import Any, Final

from vnic.controller._parse import (
    attempt,
    boolean,
    check_short,
    collect,
    dump_span,
    field_value,
    known_keys,
    mapping,
    number,
    span,
    span_ns,
)
from vnic.errors import FieldError, InvalidInput, show_value
from vnic.model.fields import dump_field
from vnic.model.launch import MAX_NICS, PRIMARY_NIC
from vnic.model.limits import CONTROLLER_RULES_MAX, check_count
from vnic.model.network import parse_network_name
from vnic.model.patch import dump_patch, join, read_patch
from vnic.model.profile import parse_name
from vnic.model.units import ByteSize, Duration, Probability, Rate, UnitError

#: Kinds of metric, by unit.
RATE: Final = "rate"
UTILISATION: Final = "utilisation"
DROPS: Final = "drops"
LATENCY: Final = "latency"

#: Every metric a rule may watch, with its kind.
METRICS: Final[dict[str, str]] = {
    "egress.rate": RATE,
    "ingress.rate": RATE,
    "egress.utilisation": UTILISATION,
    "ingress.utilisation": UTILISATION,
    "drops": DROPS,
    "latency": LATENCY,
}
_METRIC_EXPECTED: Final = {
    RATE: "a rate such as 10Mbit (bit/s), or 0",
    UTILISATION: "a fraction of the profile rate such as 0.9 or 90%",
    DROPS: "a number of packets per second such as 100",
    LATENCY: "a duration such as 5ms, or 0",
}

#: Fields a ``scale`` action may scale: the integer-valued unit types.
SCALABLE: Final[tuple[str, ...]] = tuple(
    f"{d}.{name}"
    for d in ("egress", "ingress")
    for name in ("rate", "peak", "burst", "delay", "jitter", "reorder", "duplicate", "corrupt")
)
ScalarType = type[Rate] | type[ByteSize] | type[Duration] | type[Probability]
_SCALAR_TYPES: Final[dict[str, ScalarType]] = {
    "rate": Rate,
    "peak": Rate,
    "burst": ByteSize,
    "delay": Duration,
    "jitter": Duration,
    "reorder": Probability,
    "duplicate": Probability,
    "corrupt": Probability,
}

RULE_KEYS: Final = (
    "name",
    "vms",
    "profile",
    "nic",
    "network",
    "metric",
    "above",
    "below",
    "for",
    "hysteresis",
    "cooldown",
    "action",
    "expires",
    "revert",
    "repeat",
)
_GLOB: Final = re.compile(r"[A-Za-z0-9._*?\[\]!-]{1,64}")
GLOB_EXPECTED: Final = "a glob of VM names such as web-* (letters, digits, . _ - * ? [ ])"
_NIC_GLOB: Final = re.compile(r"[a-z0-9*?\[\]!-]{1,16}")
#: Every vNIC name a VM may have: a ``nic`` glob must match one of them.
NIC_NAMES: Final = tuple(f"eth{i}" for i in range(MAX_NICS))
NIC_GLOB_EXPECTED: Final = (
    f"a vNIC name {NIC_NAMES[0]}..{NIC_NAMES[-1]} or a glob of them such as eth* or eth[12]"
)


def scalar_type(path: str) -> ScalarType:
    """The unit type of a scalable field."""
    return _SCALAR_TYPES[path.partition(".")[2]]


# --------------------------------------------------------------------------- thresholds


def parse_metric_value(kind: str, raw: Any, path: str) -> float:
    """A threshold (or hysteresis) in the metric's base unit: bit/s, fraction, packets/s, s."""
    expected = _METRIC_EXPECTED[kind]
    if isinstance(raw, bool):
        raise InvalidInput.one(path, raw, expected)
    if kind == RATE:
        if raw == 0 or raw == "0":
            return 0.0
        try:
            return float(Rate.parse(raw).value)
        except UnitError as exc:
            raise InvalidInput.one(path, raw, exc.expected) from None
    if kind == LATENCY:
        if raw == 0 or raw == "0":
            return 0.0
        try:
            return Duration.parse(raw).value / 1e9
        except UnitError as exc:
            raise InvalidInput.one(path, raw, exc.expected) from None
    if kind == UTILISATION and isinstance(raw, str) and raw.strip().endswith("%"):
        check_short(raw, path, expected)
        try:
            value = float(Decimal(raw.strip()[:-1].strip()) / 100)
        except InvalidOperation:
            raise InvalidInput.one(path, raw, expected) from None
    else:
        value = number(raw, path, expected)
    if value < 0 or not math.isfinite(value):
        raise InvalidInput.one(path, raw, f"{expected}, not negative")
    return value


def dump_metric_value(kind: str, value: float) -> Any:
    """The canonical document form of a threshold (see :func:`parse_metric_value`)."""
    if kind == RATE:
        return str(Rate(round(value))) if value >= 1 else 0
    if kind == LATENCY:
        ns = round(value * 1e9)
        return str(Duration(ns)) if ns else 0
    return int(value) if float(value).is_integer() else value


def show_metric_value(kind: str, value: float) -> str:
    """A metric value for a message: ``80Mbit``, ``0.95``, ``12.5ms``."""
    if kind == RATE:
        return str(Rate(round(value))) if value >= 1 else f"{value:g}bit"
    if kind == LATENCY:
        return f"{value * 1e3:.3g}ms"
    return f"{value:.3g}"


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Scale:
    """Multiply ``field`` by ``factor``, clamped to ``[floor, ceiling]`` (typed, or None)."""

    field: str
    factor: float
    floor: Any = None
    ceiling: Any = None

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"field": self.field, "factor": _plain(self.factor)}
        if self.floor is not None:
            doc["floor"] = dump_field(self.field, self.floor)
        if self.ceiling is not None:
            doc["ceiling"] = dump_field(self.field, self.ceiling)
        return {"scale": doc}


@dataclass(frozen=True)
class SetFields:
    """Set fields to these typed values (``OFF`` removes)."""

    values: Mapping[str, Any]

    def to_document(self) -> dict[str, Any]:
        return {"set": dump_patch(self.values)}


@dataclass(frozen=True)
class SwitchProfile:
    """Switch to the named profile (resolved by the caller)."""

    name: str

    def to_document(self) -> dict[str, Any]:
        return {"profile": self.name}


Action = Scale | SetFields | SwitchProfile
ACTIONS: Final = ("scale", "set", "profile")


def _plain(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def parse_action(raw: Any, path: str) -> Action:
    doc = mapping(raw, path, "a mapping with exactly one of scale, set, profile")
    errors = known_keys(doc, path, ACTIONS)
    if errors:
        raise InvalidInput(errors)
    given = [k for k in ACTIONS if k in doc]
    if len(given) != 1:
        raise InvalidInput.one(
            path,
            ", ".join(given) if given else "no action",
            "exactly one of scale, set, profile",
        )
    kind = given[0]
    here = join(path, kind)
    if kind == "set":
        return SetFields(read_patch(doc["set"], here))
    if kind == "profile":
        return SwitchProfile(parse_name(doc["profile"], here))
    return _parse_scale(doc["scale"], here)


def _parse_scale(raw: Any, path: str) -> Scale:
    doc = mapping(raw, path, "a mapping {field, factor, floor, ceiling}")
    errors = known_keys(doc, path, ("field", "factor", "floor", "ceiling"))
    target = doc.get("field")
    if target not in SCALABLE:
        errors.append(
            FieldError(join(path, "field"), show_value(target), "one of " + ", ".join(SCALABLE))
        )
        target = None
    factor = 0.0
    if "factor" not in doc:
        errors.append(FieldError(join(path, "factor"), "nothing", "a positive number such as 2"))
    else:
        factor = collect(
            errors,
            lambda: number(doc["factor"], join(path, "factor"), "a positive number such as 2"),
            0.0,
        )
        if factor <= 0 and not errors:
            errors.append(
                FieldError(
                    join(path, "factor"), show_value(doc["factor"]), "a positive number such as 2"
                )
            )
    bounds: dict[str, Any] = {}
    for key in ("floor", "ceiling"):
        if key in doc and target is not None:
            where = join(path, key)
            value = attempt(errors, field_value, target, doc[key], where)
            if value is not None and not isinstance(value, scalar_type(target)):
                errors.append(FieldError(where, show_value(doc[key]), f"a value of {target}"))
                value = None
            bounds[key] = value
    floor, ceiling = bounds.get("floor"), bounds.get("ceiling")
    if floor is not None and ceiling is not None and floor > ceiling:
        errors.append(
            FieldError(join(path, "ceiling"), str(ceiling), f"at least the floor {floor}")
        )
    if errors:
        raise InvalidInput(errors)
    assert target is not None
    return Scale(target, factor, floor, ceiling)


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """A validated threshold rule. Times are in seconds; thresholds in the metric's base unit.

    ``direction`` is ``"above"`` or ``"below"``. The condition *holds* while the
    metric is strictly beyond ``threshold``; after a firing the rule is *clear*
    once the metric is at or past ``threshold ∓ hysteresis``.
    """

    name: str
    metric: str
    direction: str
    threshold: float
    action: Action
    for_s: float = 0.0
    hysteresis: float = 0.0
    cooldown_s: float = 0.0
    expires_s: float | None = None
    revert: bool = False
    repeat: bool = False
    vms: str | None = None
    profile: str | None = None
    nic: str | None = None
    network: str | None = None

    @property
    def kind(self) -> str:
        """The metric's kind: rate, utilisation, drops or latency."""
        return METRICS[self.metric]

    @property
    def rearm_at(self) -> float:
        """The value past which the condition counts as over (threshold ∓ hysteresis)."""
        if self.direction == "above":
            return self.threshold - self.hysteresis
        return self.threshold + self.hysteresis

    def holds(self, value: float) -> bool:
        return value > self.threshold if self.direction == "above" else value < self.threshold

    def clear(self, value: float) -> bool:
        """Whether ``value`` is back past the hysteresis band."""
        return value <= self.rearm_at if self.direction == "above" else value >= self.rearm_at

    def applies_to(
        self,
        vm: str,
        profiles: Collection[str] | None,
        nic: str = PRIMARY_NIC,
        network: str | None = None,
    ) -> bool:
        """Whether the rule watches vNIC ``nic`` of ``vm``, on ``network`` (None =
        unknown: a rule with ``network`` then does not apply); ``profiles`` = the
        profiles the vNIC's effective profile is built from (None = unknown: a rule
        with ``profile`` then does not apply). A rule with neither ``nic`` nor
        ``network`` watches eth0 only."""
        if self.vms is not None and not fnmatchcase(vm, self.vms):
            return False
        if self.nic is None and self.network is None and nic != PRIMARY_NIC:
            return False
        if self.nic is not None and not fnmatchcase(nic, self.nic):
            return False
        if self.network is not None and network != self.network:
            return False
        return self.profile is None or (profiles is not None and self.profile in profiles)

    def describe(self) -> str:
        """``egress.utilisation above 0.9 for 5s``."""
        threshold = dump_metric_value(self.kind, self.threshold)
        return f"{self.metric} {self.direction} {threshold} for {dump_span(self.for_s)}"

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name}
        if self.vms is not None:
            doc["vms"] = self.vms
        if self.profile is not None:
            doc["profile"] = self.profile
        if self.nic is not None:
            doc["nic"] = self.nic
        if self.network is not None:
            doc["network"] = self.network
        doc["metric"] = self.metric
        doc[self.direction] = dump_metric_value(self.kind, self.threshold)
        doc["for"] = dump_span(self.for_s)
        doc["hysteresis"] = dump_metric_value(self.kind, self.hysteresis)
        doc["cooldown"] = dump_span(self.cooldown_s)
        doc["action"] = self.action.to_document()
        if self.expires_s is not None:
            doc["expires"] = dump_span(self.expires_s)
        doc["revert"] = self.revert
        if self.repeat:
            doc["repeat"] = True
        return doc


def parse_rule(doc: Any, path: str = "rules[0]") -> Rule:
    """Read one rule document; every problem is collected and raised together."""
    doc = mapping(doc, path, "a rule: a mapping with name, metric, above or below, action")
    errors = known_keys(doc, path, RULE_KEYS)

    def at(key: str) -> str:
        return join(path, key)

    name = collect(errors, lambda: parse_name(doc.get("name"), at("name")), "")
    vms = None
    if doc.get("vms") is not None:
        raw = doc["vms"]
        if isinstance(raw, str) and _GLOB.fullmatch(raw):
            vms = raw
        else:
            errors.append(FieldError(at("vms"), show_value(raw), GLOB_EXPECTED))
    profile = None
    if doc.get("profile") is not None:
        profile = collect(errors, lambda: parse_name(doc["profile"], at("profile")), None)
    nic = None
    if doc.get("nic") is not None:
        raw = doc["nic"]
        if (
            isinstance(raw, str)
            and _NIC_GLOB.fullmatch(raw)
            and any(fnmatchcase(n, raw) for n in NIC_NAMES)
        ):
            nic = raw
        else:
            errors.append(FieldError(at("nic"), show_value(raw), NIC_GLOB_EXPECTED))
    network = None
    if doc.get("network") is not None:
        network = collect(errors, lambda: parse_network_name(doc["network"], at("network")), None)
    metric = doc.get("metric")
    if metric not in METRICS:
        errors.append(FieldError(at("metric"), show_value(metric), "one of " + ", ".join(METRICS)))
        metric = None
    directions = [d for d in ("above", "below") if d in doc]
    direction = directions[0] if len(directions) == 1 else ""
    if len(directions) != 1:
        errors.append(
            FieldError(
                path,
                " and ".join(directions) if directions else "neither above nor below",
                "exactly one of above, below",
            )
        )
    threshold = hysteresis = 0.0
    if metric is not None and direction:
        kind = METRICS[metric]
        threshold = collect(
            errors, lambda: parse_metric_value(kind, doc[direction], at(direction)), 0.0
        )
        if "hysteresis" in doc:
            hysteresis = collect(
                errors, lambda: parse_metric_value(kind, doc["hysteresis"], at("hysteresis")), 0.0
            )
        if direction == "above" and hysteresis > threshold:
            errors.append(
                FieldError(
                    at("hysteresis"),
                    show_value(doc.get("hysteresis")),
                    f"at most the threshold {dump_metric_value(kind, threshold)} "
                    "(the metric must be able to fall back past it)",
                )
            )
    for_s = collect(errors, lambda: span(doc.get("for", 0), at("for")), 0.0)
    cooldown_s = collect(errors, lambda: span(doc.get("cooldown", 0), at("cooldown")), 0.0)
    expires_s = None
    if doc.get("expires") is not None:
        expires_s = collect(
            errors, lambda: span_ns(doc["expires"], at("expires"), positive=True) / 1e9, None
        )
    revert = collect(errors, lambda: boolean(doc.get("revert", False), at("revert")), False)
    repeat = collect(errors, lambda: boolean(doc.get("repeat", False), at("repeat")), False)
    action: Action | None = None
    if "action" not in doc:
        errors.append(FieldError(at("action"), "nothing", "exactly one of scale, set, profile"))
    else:
        action = collect(errors, lambda: parse_action(doc["action"], at("action")), None)
    if repeat and action is not None and not isinstance(action, Scale):
        errors.append(
            FieldError(at("repeat"), "true", "repeat only with a scale action (it steps further)")
        )
    if errors:
        raise InvalidInput(errors)
    assert metric is not None and action is not None
    return Rule(
        name=name,
        metric=metric,
        direction=direction,
        threshold=threshold,
        action=action,
        for_s=for_s,
        hysteresis=hysteresis,
        cooldown_s=cooldown_s,
        expires_s=expires_s,
        revert=revert,
        repeat=repeat,
        vms=vms,
        profile=profile,
        nic=nic,
        network=network,
    )


def parse_rules(docs: Any, path: str = "rules") -> tuple[Rule, ...]:
    """Read a list of rules; names must be unique. Errors of every rule are raised together."""
    if docs is None:
        return ()
    if not isinstance(docs, list | tuple):
        raise InvalidInput.one(path, docs, "a list of rules")
    check_count(docs, path, CONTROLLER_RULES_MAX, "rules")
    errors: list[FieldError] = []
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for i, doc in enumerate(docs):
        here = f"{path}[{i}]"
        rule = attempt(errors, parse_rule, doc, here)
        if rule is None:
            continue
        if rule.name in seen:
            errors.append(
                FieldError(
                    f"{here}.name",
                    show_value(rule.name),
                    f"a name not used by {path}[{seen[rule.name]}]",
                )
            )
            continue
        seen[rule.name] = i
        rules.append(rule)
    if errors:
        raise InvalidInput(errors)
    return tuple(rules)
