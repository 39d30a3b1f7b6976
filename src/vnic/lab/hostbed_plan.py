"""The topology of an emulated-host test bed, as data: names and addresses (pure).

A bed (:mod:`vnic.lab.hostbed`) with tag ``T`` and ``N`` hosts is:

=======================  ==================  ==========================================
what                     name                where
=======================  ==================  ==========================================
underlay namespace       ``vnic-ul-T``       the machine's ``/run/netns``
underlay bridge          ``br-T``            in ``vnic-ul-T``
manager host             ``vnic-hm-T``       the machine's ``/run/netns``; address .1
host ``i`` (1..N)        ``vnic-hI-T``       the machine's ``/run/netns``; address .(10+i)
a host's underlay NIC    ``ul-T``            in the host (its veth peer ``hI-T`` / ``hm-T``
                                             is a port of ``br-T``)
partition table          ``inet vnic-part-T`` nftables, in the host while partitioned
=======================  ==================  ==========================================

Every name carries the tag, so two beds side by side never clash, and every link
an alias ``vnic-hostbed:T/<host>`` (its owner). Interface names stay within the
kernel's 15 characters: a tag is 1 to 8 lower-case letters and digits, and a bed
has at most :data:`MAX_HOSTS` hosts.

The IPv6 address of a host repeats the digits of its IPv4 host part (``.11`` is
``::11``, ``.1`` is ``::1``), so the two read alike.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from vnic.errors import InvalidInput

TAG = re.compile(r"[a-z0-9]{1,8}")
#: The most hosts a bed has (interface names ``h99-T`` fit, addresses .11 to .109).
MAX_HOSTS = 99
#: The IPv4 host part of host 1 (host ``i`` is at ``HOST_BASE + i``); the manager's is 1.
HOST_BASE = 10
MANAGER = "hm"
ALIAS_PREFIX = "vnic-hostbed"


@dataclass(frozen=True)
class HostSpec:
    """One emulated host of a bed: its short name (``hm``, ``h1``...), its network
    namespace, its port on the underlay bridge, its underlay NIC, and its addresses."""

    short: str
    netns: str
    port: str
    ifname: str
    address4: ipaddress.IPv4Interface
    address6: ipaddress.IPv6Interface
    alias: str


@dataclass(frozen=True)
class BedPlan:
    """What a bed consists of (see the module's table)."""

    tag: str
    underlay: str
    bridge: str
    manager: HostSpec
    hosts: tuple[HostSpec, ...]
    nft_table: str

    @property
    def every_host(self) -> tuple[HostSpec, ...]:
        """The manager host, then the hosts."""
        return (self.manager, *self.hosts)

    def names(self) -> set[str]:
        """Every network namespace of the bed (in the machine's ``/run/netns``)."""
        return {self.underlay, *(h.netns for h in self.every_host)}

    def owns_link(self, ifname: str, alias: str | None) -> bool:
        """Whether a link with this name and alias is one of the bed's."""
        return ifname.endswith(f"-{self.tag}") or (alias or "").startswith(
            f"{ALIAS_PREFIX}:{self.tag}/"
        )


def _host(
    tag: str,
    short: str,
    offset: int,
    net4: ipaddress.IPv4Network,
    net6: ipaddress.IPv6Network,
    prefix6: int,
) -> HostSpec:
    v4 = ipaddress.IPv4Address(int(net4.network_address) + offset)
    v6 = ipaddress.IPv6Address(int(net6.network_address) + int(str(offset), 16))
    return HostSpec(
        short=short,
        netns=f"vnic-{short}-{tag}",
        port=f"{short}-{tag}",
        ifname=f"ul-{tag}",
        address4=ipaddress.IPv4Interface(f"{v4}/{net4.prefixlen}"),
        address6=ipaddress.IPv6Interface(f"{v6}/{prefix6}"),
        alias=f"{ALIAS_PREFIX}:{tag}/{short}",
    )


def plan_bed(tag: str, count: int, subnet4: str, subnet6: str) -> BedPlan:
    """The bed with ``tag`` and ``count`` hosts on ``subnet4`` and ``subnet6``;
    :class:`~vnic.errors.InvalidInput` naming the field when one is not valid."""
    if not isinstance(tag, str) or not TAG.fullmatch(tag):
        raise InvalidInput.one("tag", tag, "1 to 8 lower-case letters and digits")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_HOSTS:
        raise InvalidInput.one("count", count, f"a whole number of hosts from 1 to {MAX_HOSTS}")
    last = HOST_BASE + count
    try:
        net4 = ipaddress.IPv4Network(subnet4)
    except ValueError:
        raise InvalidInput.one(
            "subnet4", subnet4, "an IPv4 network such as 10.250.0.0/24"
        ) from None
    if net4.num_addresses < last + 2:
        raise InvalidInput.one(
            "subnet4", subnet4, f"an IPv4 network with room for .1 and .11 to .{last} (a /24 has)"
        )
    try:
        net6 = ipaddress.IPv6Network(subnet6)
    except ValueError:
        raise InvalidInput.one(
            "subnet6", subnet6, "an IPv6 network such as fd00:250::/64"
        ) from None
    if net6.num_addresses < int(str(last), 16) + 1:
        raise InvalidInput.one("subnet6", subnet6, f"an IPv6 network with room for ::1 to ::{last}")
    manager = _host(tag, MANAGER, 1, net4, net6, net6.prefixlen)
    hosts = tuple(
        _host(tag, f"h{i}", HOST_BASE + i, net4, net6, net6.prefixlen) for i in range(1, count + 1)
    )
    return BedPlan(
        tag=tag,
        underlay=f"vnic-ul-{tag}",
        bridge=f"br-{tag}",
        manager=manager,
        hosts=hosts,
        nft_table=f"vnic-part-{tag}",
    )
