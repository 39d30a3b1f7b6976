"""``compile(profile, devices) -> Plan``: pure, no I/O.

Per shaped direction the tree is::

    qdisc 1: htb default ffff
      class 1:1     rate R ceil R            (the direction's total)
        class 1:10+i  rate G_i ceil C_i prio P_i   (QoS class i) -> bfifo
        class 1:ffff  rate R - sum(G) ceil R prio 7 (everything else) -> bfifo
    u32 filters on 1: send matching packets to 1:10+i

VM ingress is shaped on the egress of the host-side port; VM egress is
redirected from the port's ingress to an IFB and shaped on the IFB's egress.

Burst and cburst are the profile's burst (derived from the rate when unset);
quantum is one full frame, set explicitly so HTB never computes it from r2q.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from itertools import product

from vnic.model.profile import Direction, Profile
from vnic.model.qos import PROTOCOLS, IpNetwork, PortRange, QosClass, QosMatch
from vnic.plan.model import (
    ETH_HEADER,
    ClassifierFilter,
    Devices,
    DirectionPlan,
    HtbClass,
    HtbRoot,
    Identity,
    LeafQueue,
    Plan,
    PortGuard,
    Redirect,
    Sysctl,
    U32Match,
)

ROOT_MINOR = 1
DEFAULT_MINOR = 0xFFFF
FIRST_CLASS_MINOR = 0x10
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
#: Smallest rate the default class gets when QoS classes guarantee everything (bytes/s).
MIN_DEFAULT_RATE = 1000
#: Transport header offsets assumed by port matches: IPv4 without options, IPv6
#: without extension headers (what a VM's TCP/UDP traffic almost always is).
IPV4_L4 = 20
IPV6_L4 = 40
MATCH_ALL = U32Match(0, 0, 0)
_TRANSPORTS = (PROTOCOLS["tcp"], PROTOCOLS["udp"], PROTOCOLS["sctp"])


def compile_plan(profile: Profile, devices: Devices, identity: Identity | None = None) -> Plan:
    """Compile the host-side plan of one vNIC from its effective profile.

    With ``identity``, the plan also guards the port against spoofed MAC, ARP
    and IP sources and applies the egress DSCP mark.
    """
    frame = profile.mtu.value + ETH_HEADER
    egress = _direction("egress", profile.egress, profile.qos.egress, devices.ifb, frame)
    ingress = _direction("ingress", profile.ingress, profile.qos.ingress, devices.port, frame)
    redirect = Redirect(devices.port, devices.ifb) if egress.shaped else None
    guard = None
    if identity is not None:
        mark = profile.egress.dscp_mark.value if profile.egress.dscp_mark else None
        guard = PortGuard(devices.port, guard_chain(devices.port), identity, mark)
    return Plan(
        devices=devices,
        egress=egress,
        ingress=ingress,
        redirect=redirect,
        guard=guard,
        sysctls=_sysctls(profile),
        congestion_control=profile.tcp.congestion_control,
    )


def guard_chain(port: str) -> str:
    """The nftables chain holding the guard of ``port``."""
    return f"vm_{port}"


def _direction(
    name: str, d: Direction, classes: tuple[QosClass, ...], device: str, frame: int
) -> DirectionPlan:
    if d.rate is None:
        return DirectionPlan(name)
    rate = d.rate.value // 8 or 1
    burst = d.burst.value if d.burst else 2 * frame
    limit_kind, limit = _queue(d, frame)
    htb_classes = [HtbClass(device, ROOT_MINOR, 0, rate, rate, burst, burst, frame, 0)]
    leaves = []
    filters: list[ClassifierFilter] = []
    guaranteed = 0
    for i, cls in enumerate(classes):
        minor = FIRST_CLASS_MINOR + i
        g = cls.guaranteed.value // 8 or 1
        ceil = (cls.ceiling.value // 8) if cls.ceiling else rate
        guaranteed += g
        htb_classes.append(
            HtbClass(device, minor, ROOT_MINOR, g, max(ceil, g), burst, burst, frame, cls.priority)
        )
        leaves.append(LeafQueue(device, minor, limit_kind, limit))
        # A filter priority belongs to one protocol in tc, so IPv4 and IPv6
        # filters of a class get neighbouring priorities; class order is kept.
        filters += [
            ClassifierFilter(device, 10 + 2 * i + (proto == ETH_P_IPV6), proto, keys, minor)
            for proto, keys in match_keys(cls.match, name)
        ]
    default_rate = max(rate - guaranteed, min(rate, MIN_DEFAULT_RATE))
    htb_classes.append(
        HtbClass(device, DEFAULT_MINOR, ROOT_MINOR, default_rate, rate, burst, burst, frame, 7)
    )
    leaves.append(LeafQueue(device, DEFAULT_MINOR, limit_kind, limit))
    return DirectionPlan(
        direction=name,
        device=device,
        root=HtbRoot(device, DEFAULT_MINOR),
        classes=tuple(htb_classes),
        leaves=tuple(leaves),
        filters=tuple(filters),
    )


def _queue(d: Direction, frame: int) -> tuple[str, int]:
    if d.queue is None:
        return "bfifo", 4 * frame
    if d.queue.unit == "packets":
        return "pfifo", d.queue.amount
    return "bfifo", max(d.queue.amount, frame)


# ----------------------------------------------------------------------------- u32 matches


def match_keys(match: QosMatch, direction: str) -> Iterator[tuple[int, tuple[U32Match, ...]]]:
    """Every (EtherType, u32 keys) filter that together express ``match``.

    Keys within one filter must all hold (AND); separate filters are
    alternatives (OR). An empty match takes every packet that no earlier
    class took (filters are tried in class order). A match listing several values of a key, or ports that
    may be source or destination, becomes several filters.
    """
    families = _families(match)
    for family in families:
        dscps: list[U32Match | None] = [_dscp_key(d.value, family) for d in match.dscp] or [None]
        protos: list[int | None] = list(match.protocol) or [None]
        nets: list[IpNetwork | None] = [n for n in match.networks if n.version == family]
        if not match.networks:
            nets = [None]
        for dscp, proto, net in product(dscps, protos, nets):
            base = [
                k for k in (dscp, _proto_key(proto, family) if proto is not None else None) if k
            ]
            if net is not None:
                base += _network_keys(net, direction)
            if not match.ports:
                # No key at all: the class takes everything that reaches its filter.
                yield (ETH_P_IP if family == 4 else ETH_P_IPV6), tuple(base) or (MATCH_ALL,)
                continue
            for port_key in _port_keys(match.ports, family, proto):
                yield (ETH_P_IP if family == 4 else ETH_P_IPV6), (*base, *port_key)


def _families(match: QosMatch) -> list[int]:
    if match.networks:
        return sorted({n.version for n in match.networks})
    if match.protocol and all(p == PROTOCOLS["icmp"] for p in match.protocol):
        return [4]
    if match.protocol and all(p == PROTOCOLS["icmpv6"] for p in match.protocol):
        return [6]
    return [4, 6]


def _dscp_key(dscp: int, family: int) -> U32Match:
    if family == 4:  # TOS byte: bits 23..16 of word 0; DSCP is its top six bits
        return U32Match(dscp << 18, 0x00FC0000, 0)
    return U32Match(dscp << 22, 0x0FC00000, 0)  # traffic class: bits 27..20


def _proto_key(proto: int, family: int) -> U32Match:
    if family == 4:  # protocol: bits 23..16 of word 2
        return U32Match(proto << 16, 0x00FF0000, 8)
    return U32Match(proto << 8, 0x0000FF00, 4)  # next header: bits 15..8 of word 1


def _network_keys(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network, direction: str
) -> list[U32Match]:
    # The remote end: destination of what the VM sends, source of what it receives.
    remote_is_dst = direction == "egress"
    if net.version == 4:
        offset = 16 if remote_is_dst else 12
        mask = int(net.netmask)
        return [U32Match(int(net.network_address) & mask, mask, offset)] if mask else []
    offset = 24 if remote_is_dst else 8
    addr = int(net.network_address).to_bytes(16, "big")
    netmask = int(net.netmask).to_bytes(16, "big")
    keys = []
    for word in range(4):
        m = int.from_bytes(netmask[4 * word : 4 * word + 4], "big")
        if m:
            v = int.from_bytes(addr[4 * word : 4 * word + 4], "big") & m
            keys.append(U32Match(v, m, offset + 4 * word))
    return keys


def _port_keys(
    ports: tuple[PortRange, ...], family: int, proto: int | None
) -> Iterator[tuple[U32Match, ...]]:
    l4 = IPV4_L4 if family == 4 else IPV6_L4
    protos = [proto] if proto is not None else list(_TRANSPORTS)
    for p in protos:
        # Without a protocol key, a port key alone would also match ICMP bytes.
        proto_keys = (_proto_key(p, family),) if proto is None else ()
        for rng in ports:
            for value, mask in port_prefixes(rng.first, rng.last):
                yield (*proto_keys, U32Match(value << 16, mask << 16, l4))  # source port
                yield (*proto_keys, U32Match(value, mask, l4))  # destination port


def port_prefixes(first: int, last: int) -> list[tuple[int, int]]:
    """Cover ``first..last`` exactly with (value, mask) prefixes of 16-bit ports."""
    out = []
    while first <= last:
        size = first & -first if first else 1 << 16
        while size > last - first + 1:
            size >>= 1
        out.append((first, (0xFFFF ^ (size - 1)) & 0xFFFF))
        first += size
    return out


# ----------------------------------------------------------------------------- TCP


def _sysctls(profile: Profile) -> tuple[Sysctl, ...]:
    tcp = profile.tcp
    out = []
    if tcp.window_scaling is not None:
        out.append(Sysctl("net.ipv4.tcp_window_scaling", "1" if tcp.window_scaling else "0"))
    if tcp.sack is not None:
        out.append(Sysctl("net.ipv4.tcp_sack", "1" if tcp.sack else "0"))
    if tcp.timestamps is not None:
        out.append(Sysctl("net.ipv4.tcp_timestamps", "1" if tcp.timestamps else "0"))
    if tcp.ecn is not None:
        out.append(Sysctl("net.ipv4.tcp_ecn", {"off": "0", "on": "1", "passive": "2"}[tcp.ecn]))
    return tuple(out)
