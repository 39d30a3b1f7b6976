"""A session's networks and a VM's vNICs: names, subnets, addresses, and the CLI form
of a vNIC (``--nic net=data,profile=fast,set=egress.rate=5Mbit``).

Pure: the manager stores networks and vNICs, this module reads and checks what
callers give. A network's subnets are an IPv4 network of at least 256 addresses
(prefix /8../24) and an IPv6 network of at least 256 (prefix /8../120); a vNIC's
addresses are its network's first address plus its host index (2..254; .1 is kept
for a gateway, as on ``default`` before there were networks), with the subnet's
prefix length.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from vnic.errors import FieldError, InvalidInput, show_value
from vnic.model.launch import MAX_NICS, NIC_NAME
from vnic.model.session import VM_NAME_EXPECTED, parse_vm_name

NETWORK_NAME_EXPECTED: Final = VM_NAME_EXPECTED
#: Host indexes a vNIC's address may take in its network (2..254).
HOST_INDEX_MIN: Final = 2
HOST_INDEX_MAX: Final = 254
IPV4_PREFIX_MAX: Final = 24
IPV6_PREFIX_MAX: Final = 120


def parse_network_name(value: Any, path: str = "network") -> str:
    """A network name: the rules of a VM name."""
    try:
        return parse_vm_name(value, path)
    except InvalidInput:
        raise InvalidInput.one(path, value, f"a network name of {NETWORK_NAME_EXPECTED}") from None


def parse_nic_name(value: Any, path: str = "nic") -> str:
    if not isinstance(value, str) or not NIC_NAME.fullmatch(value):
        raise InvalidInput.one(path, value, f"a vNIC name eth0..eth{MAX_NICS - 1}")
    return value


def nic_name(position: int) -> str:
    """The name of the vNIC at ``position`` (0 -> ``eth0``)."""
    return f"eth{position}"


def parse_ipv4_subnet(value: Any, path: str = "ipv4") -> ipaddress.IPv4Network:
    return _parse_subnet(value, path, ipaddress.IPv4Network, IPV4_PREFIX_MAX, "10.20.0.0/24")


def parse_ipv6_subnet(value: Any, path: str = "ipv6") -> ipaddress.IPv6Network:
    return _parse_subnet(value, path, ipaddress.IPv6Network, IPV6_PREFIX_MAX, "fd00:1::/64")


_Subnet = TypeVar("_Subnet", ipaddress.IPv4Network, ipaddress.IPv6Network)


def _parse_subnet(
    value: Any, path: str, kind: type[_Subnet], prefix_max: int, example: str
) -> _Subnet:
    """A subnet of ``kind`` in CIDR form (host bits zero) with a prefix of /8../``prefix_max``."""
    family = "IPv4" if kind is ipaddress.IPv4Network else "IPv6"
    expected = f"an {family} network in CIDR form with a prefix of /8../{prefix_max}"
    try:
        net = kind(str(value), strict=True) if isinstance(value, str) else None
    except ValueError:
        net = None
    if net is None or not 8 <= net.prefixlen <= prefix_max:
        raise InvalidInput.one(path, value, f"{expected}, e.g. {example}")
    return net


def nic_addresses(
    ipv4: ipaddress.IPv4Network, ipv6: ipaddress.IPv6Network, host_index: int
) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv6Interface]:
    """A vNIC's interface addresses in its network's subnets (host index 2..254)."""
    if not HOST_INDEX_MIN <= host_index <= HOST_INDEX_MAX:
        raise ValueError(f"host index is 2..254, got {host_index}")
    return (
        ipaddress.IPv4Interface((int(ipv4.network_address) + host_index, ipv4.prefixlen)),
        ipaddress.IPv6Interface((int(ipv6.network_address) + host_index, ipv6.prefixlen)),
    )


@dataclass(frozen=True)
class NicSpec:
    """A vNIC asked for when a VM is added: its network and its own override
    (a profile, and/or a per-field ``patch`` of typed values)."""

    network: str = "default"
    profile: str | None = None
    patch: Mapping[str, Any] | None = None


def check_nic_specs(specs: Any, path: str = "nics") -> None:
    """Refuse more than :data:`MAX_NICS` vNICs (or none), naming how many and why."""
    if not specs:
        raise InvalidInput.one(path, "[]", "at least one vNIC (eth0)")
    if len(specs) > MAX_NICS:
        raise InvalidInput.one(
            path,
            f"{len(specs)} vNICs",
            f"at most {MAX_NICS} (eth0..eth{MAX_NICS - 1}: vnic names a VM's vNICs by position)",
        )


def parse_nic_cli(text: str, position: int, path: str = "--nic") -> NicSpec:
    """Read ``net=NAME,profile=P,set=FIELD=VALUE,set=...`` (CLI ``--nic``; every key
    optional: ``net`` defaults to ``default``)."""
    from vnic.model.profile import parse_assignments, parse_name

    where = f"{path}[{position}]"
    network = "default"
    profile: str | None = None
    sets: list[str] = []
    errors: list[FieldError] = []
    for part in (p for p in text.split(",") if p.strip()):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in ("net", "network", "profile", "set"):
            errors.append(
                FieldError(
                    where, show_value(part), "net=NETWORK, profile=PROFILE or set=FIELD=VALUE"
                )
            )
        elif key in ("net", "network"):
            network = value.strip()
        elif key == "profile":
            profile = value.strip()
        else:
            sets.append(value)
    if errors:
        raise InvalidInput(errors)
    network = parse_network_name(network, f"{where}.net")
    if profile is not None:
        profile = parse_name(profile, f"{where}.profile")
    try:
        patch = parse_assignments(sets) if sets else None
    except InvalidInput as exc:
        raise exc.under(where) from None
    return NicSpec(network, profile, patch)


@dataclass(frozen=True)
class NetworkSpec:
    """A network to add to a session (None: allocated / derived / none)."""

    name: str
    network_id: int | None = None
    ipv4: str | None = None
    ipv6: str | None = None
    default_profile: str | None = None
