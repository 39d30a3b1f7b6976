"""Placement: which hypervisor host a VM is launched on. Pure.

A host can take a VM when its agent holds a lease (``ready``), it is not cordoned,
it has every label the constraint asks for, and its free vNIC capacity covers the
VM's vNICs. Among those, ``spread`` (the default) picks the host with the fewest of
the session's VMs, then the least used; ``pack`` the host with the most of the
session's VMs, then the most used: a session on as few hosts as fit it.
Ties go to the name, so the same state always places the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vnic.errors import Conflict, Exhausted, InvalidInput, NotFound

STRATEGIES = ("spread", "pack")
HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
HOST_NAME_EXPECTED = "1 to 32 of a-z, 0-9 and '-', not starting or ending with '-'"
LABEL_KEY = re.compile(r"^[a-z0-9]([a-z0-9_.-]{0,62})$")
LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.:/-]{0,64}$")
#: Labels one host may carry.
MAX_LABELS = 16


@dataclass(frozen=True)
class Candidate:
    """A host as placement sees it: ``vnics`` its capacity, ``used`` the vNICs placed on
    it, ``session_vms`` the VMs of the session being placed already there."""

    name: str
    ready: bool
    cordoned: bool = False
    vnics: int = 0
    used: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    session_vms: int = 0

    def why_not(self, nics: int, labels: Mapping[str, str]) -> str | None:
        """None when the host can take a VM of ``nics`` vNICs, else why not."""
        if not self.ready:
            return "unknown (no lease)"
        if self.cordoned:
            return "cordoned"
        missing = [f"{k}={v}" for k, v in labels.items() if self.labels.get(k) != v]
        if missing:
            return f"lacks label {', '.join(missing)}"
        if self.used + nics > self.vnics:
            return f"full ({self.used} of {self.vnics} vNICs used, {nics} more asked)"
        return None


@dataclass(frozen=True)
class Constraint:
    """A session's placement policy: ``strategy`` (spread or pack) and the labels every
    host of its VMs must have."""

    strategy: str = "spread"
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "labels": dict(self.labels)}


def choose_host(
    hosts: Sequence[Candidate],
    nics: int,
    constraint: Constraint = Constraint(),
    *,
    host: str | None = None,
) -> str:
    """The host a VM of ``nics`` vNICs goes to: ``host`` if given (it must fit), else the
    best that fits by ``constraint``. NotFound for an unknown ``host``; Conflict when the
    given one cannot take it; Exhausted (naming every host and why) when none can."""
    if host is not None:
        named = {h.name: h for h in hosts}
        if host not in named:
            raise NotFound("host", host, sorted(named))
        why = named[host].why_not(nics, constraint.labels)
        if why:
            raise Conflict(f"host {host} cannot take a VM of {nics} vNIC(s): it is {why}")
        return host
    fits = [h for h in hosts if h.why_not(nics, constraint.labels) is None]
    if not fits:
        reasons = "; ".join(f"{h.name} {h.why_not(nics, constraint.labels)}" for h in hosts)
        raise Exhausted(f"no host can take a VM of {nics} vNIC(s): {reasons or 'no hosts'}")
    if constraint.strategy == "pack":
        best = min(fits, key=lambda h: (-h.session_vms, -h.used, h.name))
    else:
        best = min(fits, key=lambda h: (h.session_vms, h.used / max(h.vnics, 1), h.name))
    return best.name


def parse_host_name(value: Any, path: str = "host") -> str:
    if not isinstance(value, str) or not HOST_NAME.match(value):
        raise InvalidInput.one(path, value, HOST_NAME_EXPECTED)
    return value


def parse_labels(value: Any, path: str = "labels") -> dict[str, str]:
    """Host or constraint labels: at most :data:`MAX_LABELS` ``key: value`` strings."""
    if not isinstance(value, Mapping) or len(value) > MAX_LABELS:
        raise InvalidInput.one(path, value, f"an object of at most {MAX_LABELS} labels")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not LABEL_KEY.match(k):
            raise InvalidInput.one(f"{path}.{k}", k, "a label key: a-z, 0-9, '_', '.', '-' (1-63)")
        if not isinstance(v, str) or not LABEL_VALUE.match(v):
            raise InvalidInput.one(f"{path}.{k}", v, "a label value: letters, digits, _.:/- (0-64)")
        out[k] = v
    return out


def parse_constraint(value: Any, path: str = "placement") -> Constraint:
    """``{"strategy": "spread"|"pack", "labels": {...}}``; None is the default."""
    if value is None:
        return Constraint()
    if not isinstance(value, Mapping) or set(value) - {"strategy", "labels"}:
        raise InvalidInput.one(path, value, 'an object with "strategy" and "labels"')
    strategy = value.get("strategy", "spread")
    if strategy not in STRATEGIES:
        raise InvalidInput.one(f"{path}.strategy", strategy, " or ".join(STRATEGIES))
    labels = value.get("labels")
    # None is no labels; any other value must be labels ([] or "" is not "none").
    return Constraint(
        str(strategy), parse_labels({} if labels is None else labels, f"{path}.labels")
    )
