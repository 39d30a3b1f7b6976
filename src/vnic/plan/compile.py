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

Delay, jitter, loss, duplication, corruption and reordering take one of two
engines, chosen by the driver from what the kernel has:

* ``netem``: each leaf of an impaired direction is a netem qdisc instead of a
  FIFO (a root netem when the direction has no rate), its limit the
  bandwidth-delay product in packets; with jitter and no reordering its
  ``rate`` is set, which makes netem keep packet order.
* ``delayd`` (the vnic delay engine, :mod:`vnic.dataplane.delayd`): the VM's
  port leaves the bridge; the engine relays frames between the port and a
  relay veth whose peer is on the bridge. VM ingress is shaped on the port,
  VM egress on the relay (the engine writes into both), so no IFB is used.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from itertools import product

from vnic.model.profile import Direction, Profile
from vnic.model.qos import PROTOCOLS, IpNetwork, PortRange, QosClass, QosMatch
from vnic.model.units import Probability
from vnic.plan.model import (
    ETH_HEADER,
    ClassifierFilter,
    DelayEngine,
    Devices,
    DirectionPlan,
    HtbClass,
    HtbRoot,
    Identity,
    Impairment,
    LeafQueue,
    NetemQdisc,
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

#: Engines an impaired profile can be compiled for.
ENGINES = ("netem", "delayd")
#: Rate assumed for a direction without one when sizing what a delay line holds (bytes/s).
LINE_RATE = 10_000_000_000 // 8
#: Jitter spans this many of its units: all of a uniform jitter (+-jitter), and
#: 4 standard deviations of the other distributions.
_JITTER_SPAN = {"uniform": 1, "normal": 4, "pareto": 4, "paretonormal": 4}
_PPB = 1_000_000_000
_SEED_MASK = 2**63 - 1


def impaired(profile: Profile) -> bool:
    """Whether the profile needs an engine beyond HTB: delay, jitter, loss and the like."""
    return any(d.has_delay or d.has_loss for d in (profile.egress, profile.ingress))


def compile_plan(
    profile: Profile,
    devices: Devices,
    identity: Identity | None = None,
    *,
    engine: str | None = None,
    seed: int = 0,
) -> Plan:
    """Compile the host-side plan of one vNIC from its effective profile.

    With ``identity``, the plan also guards the port against spoofed MAC, ARP
    and IP sources and applies the egress DSCP mark. ``engine`` (one of
    :data:`ENGINES`) carries delay and loss and must be given when the profile
    is :func:`impaired`; with ``delayd`` the devices need a relay. ``seed``
    is used when the profile sets none.
    """
    if impaired(profile) and engine not in ENGINES:
        raise ValueError(f"an impaired profile needs an engine ({', '.join(ENGINES)})")
    use = engine if impaired(profile) else None
    if use == "delayd" and not (devices.relay and devices.relay_port):
        raise ValueError("the delay engine needs relay devices")
    frame = profile.mtu.value + ETH_HEADER
    base_seed = profile.seed if profile.seed is not None else seed
    impairments = {
        name: impairment(name, profile.direction(name), frame, base_seed)
        for name in ("egress", "ingress")
    }
    egress_device = devices.relay if use == "delayd" else devices.ifb
    egress = _direction("egress", profile.egress, profile.qos.egress, egress_device, frame)
    ingress = _direction("ingress", profile.ingress, profile.qos.ingress, devices.port, frame)
    engine_plan = None
    if use == "netem":
        egress = _with_netem(egress, impairments["egress"], devices.ifb, profile, frame)
        ingress = _with_netem(ingress, impairments["ingress"], devices.port, profile, frame)
    elif use == "delayd":
        engine_plan = DelayEngine(
            devices.port, devices.relay, impairments["egress"], impairments["ingress"]
        )
    redirect = Redirect(devices.port, devices.ifb) if egress.shaped and use != "delayd" else None
    guard = None
    if identity is not None:
        mark = profile.egress.dscp_mark.value if profile.egress.dscp_mark else None
        port = devices.bridge_port if use == "delayd" else devices.port
        guard = PortGuard(port, guard_chain(port), identity, mark)
    return Plan(
        devices=devices,
        egress=egress,
        ingress=ingress,
        redirect=redirect,
        guard=guard,
        sysctls=_sysctls(profile),
        congestion_control=profile.tcp.congestion_control,
        engine=engine_plan,
    )


def direction_seed(seed: int, direction: str) -> int:
    """The seed of one direction: the two directions draw independent sequences."""
    return (seed * 2 + (direction == "ingress")) & _SEED_MASK


def impairment(name: str, d: Direction, frame: int, seed: int) -> Impairment | None:
    """The direction's delay and loss settings in engine units, or None when it has none."""
    if not (d.has_delay or d.has_loss):
        return None
    delay = d.delay.value if d.delay else 0
    jitter = d.jitter.value if d.jitter else 0
    distribution = d.distribution or "uniform"
    held_time = delay + jitter * _JITTER_SPAN.get(distribution, 4)
    rate = d.rate.value // 8 if d.rate else LINE_RATE
    queue = _queue_bytes(d, frame)
    return Impairment(
        direction=name,
        delay=delay,
        jitter=jitter,
        distribution=distribution,
        reorder=_ppb(d.reorder),
        loss=_ppb(d.loss.mean) if d.loss else 0,
        loss_burst=d.loss.burst_length if d.loss else None,
        duplicate=_ppb(d.duplicate),
        corrupt=_ppb(d.corrupt),
        # What the line holds while delaying at the rate, twice over for
        # slow-start bursts, plus the direction's own queue.
        limit=2 * rate * held_time // 1_000_000_000 + queue + 64 * frame,
        seed=direction_seed(seed, name),
    )


def _ppb(p: Probability | None) -> int:
    return round(p.fraction * _PPB) if p is not None else 0


def _queue_bytes(d: Direction, frame: int) -> int:
    kind, limit = _queue(d, frame)
    return limit * frame if kind == "pfifo" else limit


def _with_netem(
    d: DirectionPlan, imp: Impairment | None, device: str, profile: Profile, frame: int
) -> DirectionPlan:
    """Put netem where the direction's FIFOs were (or at the root when it has no rate)."""
    if imp is None:
        return d
    direction = profile.direction(d.direction)
    rate = direction.rate.value // 8 if direction.rate else 0
    held = imp.delay + imp.jitter * _JITTER_SPAN.get(imp.distribution, 4)
    in_flight = (rate or LINE_RATE) * held // 1_000_000_000 + _queue_bytes(direction, frame)
    limit = max(-(-in_flight // frame), 4)
    # netem keeps packet order only when it also paces by rate.
    pace = (rate or LINE_RATE) if imp.jitter and not imp.reorder else 0
    if d.root is None:
        return DirectionPlan(
            d.direction, device=device, netem=(NetemQdisc(device, 0, imp, limit, pace),)
        )
    assert d.device is not None
    qdiscs = tuple(
        NetemQdisc(d.device, leaf.class_minor, imp, limit, _class_ceil(d, leaf.class_minor, pace))
        for leaf in d.leaves
    )
    return DirectionPlan(
        d.direction,
        device=d.device,
        root=d.root,
        classes=d.classes,
        leaves=(),
        filters=d.filters,
        netem=qdiscs,
    )


def _class_ceil(d: DirectionPlan, minor: int, pace: int) -> int:
    if not pace:
        return 0
    return next((c.ceil for c in d.classes if c.minor == minor), pace)


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
