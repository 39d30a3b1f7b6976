"""QoS classes of one direction of a vNIC.

A class has a name, a priority (0 = served first .. 7), a guaranteed rate, a
ceiling (defaults to the direction's rate) and a match. A packet belongs to the
first class whose match it satisfies; within one match every given key must
hold (DSCP *and* protocol *and* port *and* network), and within one key any
listed value may hold. A class without a match takes everything no earlier
class took (a catch-all, like ``bulk`` in the wan-dsl example). Traffic that
matches no class goes to the direction's default class, which gets whatever
the classes do not guarantee.

Matches:

``dscp``
    code points (0..63 or names such as ``ef``, ``af41``), IPv4 TOS and IPv6
    traffic class alike.
``protocol``
    ``tcp``, ``udp``, ``icmp``, ``icmpv6``, ``sctp``, ``gre`` or an IP protocol number.
``ports``
    port numbers or ``first-last`` ranges; a packet matches if its source *or*
    destination port is listed (so a server's and a client's side both match).
``networks``
    IPv4 and IPv6 networks of the *remote* end: the destination for egress,
    the source for ingress.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from vnic.errors import FieldError, show_value
from vnic.model.limits import MATCH_ITEMS_MAX, QOS_CLASSES_MAX
from vnic.model.units import MAX_TEXT, Dscp, Rate, UnitError, is_ascii_digits

PROTOCOLS: dict[str, int] = {
    "icmp": 1,
    "tcp": 6,
    "udp": 17,
    "gre": 47,
    "icmpv6": 58,
    "sctp": 132,
}
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_PORT_RANGE = re.compile(r"\s*([0-9]{1,5})\s*-\s*([0-9]{1,5})\s*")


@dataclass(frozen=True)
class PortRange:
    """An inclusive range of TCP/UDP/SCTP ports."""

    first: int
    last: int

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class QosMatch:
    """What a class matches; empty tuples mean "any"."""

    dscp: tuple[Dscp, ...] = ()
    protocol: tuple[int, ...] = ()
    ports: tuple[PortRange, ...] = ()
    networks: tuple[IpNetwork, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.dscp or self.protocol or self.ports or self.networks)

    def to_document(self) -> dict[str, Any]:
        names = {v: k for k, v in PROTOCOLS.items()}
        doc: dict[str, Any] = {}
        if self.dscp:
            doc["dscp"] = [d.value for d in self.dscp]
        if self.protocol:
            doc["protocol"] = [names.get(p, p) for p in self.protocol]
        if self.ports:
            doc["ports"] = [p.first if p.first == p.last else str(p) for p in self.ports]
        if self.networks:
            doc["networks"] = [str(n) for n in self.networks]
        return doc


@dataclass(frozen=True)
class QosClass:
    """One QoS class: priority 0 (first) .. 7, guaranteed rate, ceiling (None = direction rate)."""

    name: str
    priority: int
    guaranteed: Rate
    ceiling: Rate | None = None
    match: QosMatch = field(default_factory=QosMatch)

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "priority": self.priority,
            "guaranteed": str(self.guaranteed),
        }
        if self.ceiling is not None:
            doc["ceiling"] = str(self.ceiling)
        if not self.match.is_empty:
            doc["match"] = self.match.to_document()
        return doc


_CLASS_KEYS = {"name", "priority", "guaranteed", "ceiling", "match"}
_MATCH_KEYS = {"dscp", "protocol", "ports", "networks"}


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _parse_protocol(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        if key in PROTOCOLS:
            return PROTOCOLS[key]
        if is_ascii_digits(key) and int(key) <= 255:
            return int(key)
    raise ValueError


def _parse_port(value: Any) -> PortRange:
    if isinstance(value, int) and not isinstance(value, bool):
        first = last = value
    elif isinstance(value, str) and is_ascii_digits(value.strip()):
        first = last = int(value)
    elif isinstance(value, str) and len(value) <= MAX_TEXT and (m := _PORT_RANGE.fullmatch(value)):
        first, last = int(m.group(1)), int(m.group(2))
    else:
        raise ValueError
    if not 0 < first <= last <= 65535:
        raise ValueError
    return PortRange(first, last)


def _parse_network(value: Any) -> IpNetwork:
    if not isinstance(value, str):
        raise ValueError
    return ipaddress.ip_network(value.strip(), strict=True)


def parse_match(doc: Any, errors: list[FieldError], path: str) -> QosMatch:
    """Read a match mapping; problems are appended to ``errors`` with their paths."""
    if doc is None:
        return QosMatch()
    if not isinstance(doc, dict):
        errors.append(
            FieldError(
                path, show_value(doc), "a mapping with keys " + ", ".join(sorted(_MATCH_KEYS))
            )
        )
        return QosMatch()
    for key in sorted(set(doc) - _MATCH_KEYS):
        errors.append(
            FieldError(f"{path}.{key}", "unknown key", "one of " + ", ".join(sorted(_MATCH_KEYS)))
        )

    def each(key: str, parser: Any, expected: str) -> tuple[Any, ...]:
        out = []
        items = _as_list(doc.get(key, []))
        if len(items) > MATCH_ITEMS_MAX:
            errors.append(
                FieldError(
                    f"{path}.{key}", f"{len(items)} items", f"at most {MATCH_ITEMS_MAX} items"
                )
            )
            return ()
        for i, item in enumerate(items):
            try:
                out.append(parser(item))
            except (ValueError, UnitError):
                errors.append(FieldError(f"{path}.{key}[{i}]", show_value(item), expected))
        return tuple(out)

    return QosMatch(
        dscp=each("dscp", Dscp.parse, Dscp.EXPECTED),
        protocol=each(
            "protocol", _parse_protocol, "tcp, udp, icmp, icmpv6, sctp, gre or a number 0..255"
        ),
        ports=each("ports", _parse_port, "a port 1..65535 or a range such as 1000-2000"),
        networks=each(
            "networks",
            _parse_network,
            "an IPv4 or IPv6 network such as 10.0.0.0/8 or 2001:db8::/32",
        ),
    )


def parse_classes(doc: Any, path: str) -> tuple[tuple[QosClass, ...], list[FieldError]]:
    """Read a list of class mappings. Returns the classes and every problem found."""
    errors: list[FieldError] = []
    if not isinstance(doc, list | tuple):
        return (), [FieldError(path, show_value(doc), "a list of QoS classes")]
    if len(doc) > QOS_CLASSES_MAX:
        return (), [FieldError(path, f"{len(doc)} classes", f"at most {QOS_CLASSES_MAX} classes")]
    classes: list[QosClass] = []
    seen: set[str] = set()
    for i, item in enumerate(doc):
        here = f"{path}[{i}]"
        if not isinstance(item, dict):
            errors.append(
                FieldError(
                    here,
                    show_value(item),
                    "a mapping with name, priority, guaranteed, ceiling, match",
                )
            )
            continue
        for key in sorted(set(item) - _CLASS_KEYS):
            errors.append(
                FieldError(
                    f"{here}.{key}", "unknown key", "one of " + ", ".join(sorted(_CLASS_KEYS))
                )
            )
        before = len(errors)
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            errors.append(
                FieldError(
                    f"{here}.name", show_value(name), "a class name of 1-32 characters a-z 0-9 _ -"
                )
            )
        elif name in seen:
            errors.append(
                FieldError(f"{here}.name", show_value(name), "a name not used by another class")
            )
        else:
            seen.add(name)
        priority = item.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 7:
            errors.append(
                FieldError(f"{here}.priority", show_value(priority), "an integer 0 (first) .. 7")
            )
        guaranteed: Rate | None = None
        if "guaranteed" not in item:
            errors.append(FieldError(f"{here}.guaranteed", "missing", Rate.EXPECTED))
        else:
            try:
                guaranteed = Rate.parse(item["guaranteed"])
            except UnitError as exc:
                errors.append(
                    FieldError(f"{here}.guaranteed", show_value(item["guaranteed"]), exc.expected)
                )
        ceiling: Rate | None = None
        if item.get("ceiling") is not None:
            try:
                ceiling = Rate.parse(item["ceiling"])
            except UnitError as exc:
                errors.append(
                    FieldError(f"{here}.ceiling", show_value(item["ceiling"]), exc.expected)
                )
        match = parse_match(item.get("match"), errors, f"{here}.match")
        if guaranteed is not None and ceiling is not None and guaranteed > ceiling:
            errors.append(
                FieldError(
                    f"{here}.guaranteed", str(guaranteed), f"at most the class ceiling {ceiling}"
                )
            )
        if len(errors) == before and guaranteed is not None:
            classes.append(QosClass(str(name), int(priority), guaranteed, ceiling, match))
    return tuple(classes), errors
