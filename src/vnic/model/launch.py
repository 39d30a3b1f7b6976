"""What the manager asks a host to run, and what a host's drivers can honour.

:class:`LaunchRequest` is one VM with its vNIC's resolved profile; a driver
declares the profile fields it honours on its host as :class:`Capabilities`, and
:func:`check_supported` refuses a profile asking for anything else before anything
is touched. Pure data: the manager, the agent and the drivers all speak it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from vnic.errors import FieldError, Unsupported
from vnic.model.fields import FIELDS, dump_field
from vnic.model.profile import Profile
from vnic.model.units import MacAddress


@dataclass(frozen=True)
class LaunchRequest:
    """What the manager sends the hypervisor side to start one VM."""

    session: str
    network_id: int
    vm: str
    mac: MacAddress
    ipv4: ipaddress.IPv4Interface
    ipv6: ipaddress.IPv6Interface
    profile: Profile
    values: Mapping[str, object]
    revisions: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    """Which profile fields a driver honours here, and why the others are missing.

    ``missing`` maps a field path to the kernel feature (or vnic component)
    that would be needed for it.
    """

    kind: str
    fields: frozenset[str]
    missing: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "fields": sorted(self.fields), "missing": dict(self.missing)}


def check_supported(caps: Capabilities, values: Mapping[str, object]) -> None:
    """Refuse, naming each field and the missing feature, what ``caps`` cannot honour."""
    errors = []
    for path in FIELDS:
        value = values.get(path)
        if value is None or path in caps.fields:
            continue
        if path.endswith((".burst", ".queue", ".distribution")) or path in (
            "mtu",
            "mac_range",
            "seed",
        ):
            continue  # derived or always honoured alongside the fields they belong to
        need = caps.missing.get(path, "support in this driver")
        errors.append(
            FieldError(
                path,
                str(dump_field(path, value)),
                f"a field the {caps.kind} driver can honour here (needs {need})",
            )
        )
    if errors:
        raise Unsupported("; ".join(str(e) for e in errors))
