"""What the manager asks a host to run, and what a host's drivers can honour.

:class:`LaunchRequest` is one VM with its vNICs (:class:`NicRequest`: network, MAC,
addresses, resolved profile); a driver
declares the profile fields it honours on its host as :class:`Capabilities`, and
:func:`check_supported` refuses a profile asking for anything else before anything
is touched. Pure data: the manager, the agent and the drivers all speak it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vnic.errors import FieldError, Unsupported
from vnic.model.fields import FIELDS, dump_field
from vnic.model.profile import Profile
from vnic.model.units import MacAddress

#: The first vNIC of every VM. A VM's TCP settings (per VM, not per vNIC) come from its
#: profile, and its host-side objects keep the names they had before VMs had several.
PRIMARY_NIC = "eth0"
#: The network every session has, and that a vNIC joins unless it names another.
DEFAULT_NETWORK = "default"
#: How many vNICs a VM may have at most, whatever the driver (``eth0`` .. ``eth7``).
MAX_NICS = 8
#: A vNIC's name: ``eth`` and its position (``eth0`` .. ``eth7``).
NIC_NAME = re.compile(r"eth[0-7]")


@dataclass(frozen=True)
class NicRequest:
    """One vNIC of a launch: its network, identity and resolved profile."""

    name: str
    network: str
    network_id: int
    mac: MacAddress
    ipv4: ipaddress.IPv4Interface
    ipv6: ipaddress.IPv6Interface
    profile: Profile
    values: Mapping[str, object]
    revisions: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LaunchRequest:
    """What the manager sends the hypervisor side to start one VM: its vNICs, ``eth0``
    first.

    The host side builds one vNIC at a time from :meth:`per_nic`'s one-vNIC requests;
    ``mac``, ``ipv4``, ``values``... are the first vNIC's (of a one-vNIC request: its
    only one), and the VM's TCP settings come from the first vNIC's profile.
    """

    session: str
    vm: str
    nics: tuple[NicRequest, ...]

    def __post_init__(self) -> None:
        if not self.nics:
            raise ValueError(f"VM {self.session}/{self.vm}: a launch request needs a vNIC")
        seen = [n.name for n in self.nics]
        if len(set(seen)) != len(seen):
            raise ValueError(f"VM {self.session}/{self.vm}: vNIC names repeat: {seen}")

    @classmethod
    def single(
        cls,
        *,
        session: str,
        vm: str,
        network_id: int,
        mac: MacAddress,
        ipv4: ipaddress.IPv4Interface,
        ipv6: ipaddress.IPv6Interface,
        profile: Profile,
        values: Mapping[str, object],
        revisions: Mapping[str, int] | None = None,
        nic: str = PRIMARY_NIC,
        network: str = DEFAULT_NETWORK,
    ) -> LaunchRequest:
        """A VM with one vNIC (``eth0`` on ``default`` unless named)."""
        return cls(
            session,
            vm,
            (
                NicRequest(
                    nic, network, network_id, mac, ipv4, ipv6, profile, values, revisions or {}
                ),
            ),
        )

    @property
    def primary(self) -> NicRequest:
        return self.nics[0]

    @property
    def nic(self) -> str:
        """The first vNIC's name (of a one-vNIC request from :meth:`per_nic`: its vNIC)."""
        return self.nics[0].name

    @property
    def network(self) -> str:
        return self.nics[0].network

    @property
    def network_id(self) -> int:
        return self.nics[0].network_id

    @property
    def mac(self) -> MacAddress:
        return self.nics[0].mac

    @property
    def ipv4(self) -> ipaddress.IPv4Interface:
        return self.nics[0].ipv4

    @property
    def ipv6(self) -> ipaddress.IPv6Interface:
        return self.nics[0].ipv6

    @property
    def profile(self) -> Profile:
        return self.nics[0].profile

    @property
    def values(self) -> Mapping[str, object]:
        return self.nics[0].values

    @property
    def revisions(self) -> Mapping[str, int]:
        return self.nics[0].revisions

    @property
    def unit(self) -> str:
        """The name the host side knows the first vNIC by (see :func:`link_unit`)."""
        return link_unit(self.vm, self.nics[0].name)

    def per_nic(self) -> tuple[LaunchRequest, ...]:
        """One one-vNIC request per vNIC, in order."""
        return tuple(LaunchRequest(self.session, self.vm, (n,)) for n in self.nics)

    def only(self, nic: str) -> LaunchRequest:
        """The one-vNIC request of vNIC ``nic`` (KeyError if the VM has none of that name)."""
        for n in self.nics:
            if n.name == nic:
                return LaunchRequest(self.session, self.vm, (n,))
        raise KeyError(nic)


def link_unit(vm: str, nic: str) -> str:
    """The host side's name of a vNIC: the VM's name for ``eth0`` (so a VM launched
    before VMs had several vNICs keeps its objects), ``VM.NIC`` for the others (VM names
    have no dot, so the two never meet)."""
    return vm if nic == PRIMARY_NIC else f"{vm}.{nic}"


def nic_lines(nic: str, lines: Iterable[str]) -> list[str]:
    """``lines`` about vNIC ``nic`` (kernel changes, drift), each starting with its name
    (``eth1: ...``) unless it is ``eth0``, whose lines read as a VM's always did."""
    return list(lines) if nic == PRIMARY_NIC else [f"{nic}: {line}" for line in lines]


def unit_vm(unit: str) -> tuple[str, str]:
    """``(vm, nic)`` of a host-side name made by :func:`link_unit`."""
    vm, _, nic = unit.partition(".")
    return vm, nic or PRIMARY_NIC


@dataclass(frozen=True)
class Capabilities:
    """Which profile fields a driver honours here, and why the others are missing.

    ``missing`` maps a field path to the kernel feature (or vnic component)
    that would be needed for it.
    """

    kind: str
    fields: frozenset[str]
    missing: Mapping[str, str] = field(default_factory=dict)
    #: How many vNICs one VM may have on this driver, and why no more.
    max_nics: int = 1
    max_nics_why: str = "the driver builds one vNIC per VM"

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "fields": sorted(self.fields),
            "missing": dict(self.missing),
            "max_nics": self.max_nics,
            "max_nics_why": self.max_nics_why,
        }


def check_nic_count(caps: Capabilities, count: int) -> None:
    """Refuse a VM with more vNICs than ``caps`` allows, saying how many and why."""
    if count > caps.max_nics:
        raise Unsupported(
            str(
                FieldError(
                    "nics",
                    f"{count} vNICs",
                    f"at most {caps.max_nics} on the {caps.kind} driver ({caps.max_nics_why})",
                )
            )
        )


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
