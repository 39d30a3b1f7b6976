"""The plan: a pure, declarative description of the kernel state one vNIC needs.

A :class:`Plan` is compiled from an effective profile (see
:mod:`vnic.plan.compile`) and applied by :mod:`vnic.dataplane`. It names
devices by role, not by kernel index, so the same plan can be pointed at a
netns veth or a QEMU tap. All rates are in bytes per second and all sizes in
bytes, as the kernel takes them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

#: Bytes an Ethernet header adds to an IP packet. HTB on a veth or tap counts
#: frames including this header, so the profile's rate is the rate of
#: Ethernet frames (header + IP packet, no preamble, FCS or gap).
ETH_HEADER = 14


@dataclass(frozen=True)
class Devices:
    """The host-side devices one vNIC's plan is applied to.

    ``port``: the host end of the VM's link (bridge-side veth or tap); VM
    ingress is shaped on its egress. ``ifb``: the IFB that VM egress is
    redirected to and shaped on. ``relay``/``relay_port``: the veth pair the
    vnic delay engine writes VM egress into (``relay``) and whose other end
    sits on the bridge (``relay_port``); empty when the engine is not used.
    ``bridge``: the bridge of the vNIC's network in the session namespace
    (``vbr0`` for ``default``, see :func:`vnic.plan.names.bridge_of`).
    """

    port: str
    ifb: str
    relay: str = ""
    relay_port: str = ""
    bridge: str = "vbr0"

    @property
    def bridge_port(self) -> str:
        """The device on the bridge: the relay's when the delay engine runs, else the port."""
        return self.relay_port or self.port


@dataclass(frozen=True)
class HtbRoot:
    """``qdisc add dev DEV root handle 1: htb default DEFAULT_MINOR``."""

    device: str
    default_minor: int


@dataclass(frozen=True)
class HtbClass:
    """An HTB class ``1:MINOR`` under ``1:PARENT_MINOR`` (0 = the qdisc).

    ``rate``/``ceil`` in bytes/s; ``burst``/``cburst``/``quantum`` in bytes;
    ``prio`` 0 (first) .. 7.
    """

    device: str
    minor: int
    parent_minor: int
    rate: int
    ceil: int
    burst: int
    cburst: int
    quantum: int
    prio: int = 0


@dataclass(frozen=True)
class LeafQueue:
    """The FIFO under a leaf class: ``bfifo limit BYTES`` or ``pfifo limit PACKETS``."""

    device: str
    class_minor: int
    kind: str  # "bfifo" or "pfifo"
    limit: int


@dataclass(frozen=True)
class Impairment:
    """What one direction does to packets besides limiting their rate.

    Times in ns, probabilities in parts per billion, ``limit`` in bytes (how
    much the delay line may hold). ``loss_burst``: mean loss burst in packets
    for Gilbert–Elliott loss, None for random loss. ``seed`` drives every
    random choice, so a rerun repeats the same per-packet decisions.
    """

    direction: str
    delay: int = 0
    jitter: int = 0
    distribution: str = "uniform"
    reorder: int = 0
    loss: int = 0
    loss_burst: float | None = None
    duplicate: int = 0
    corrupt: int = 0
    limit: int = 0
    seed: int = 0

    @property
    def per_packet(self) -> bool:
        """Whether decisions are per packet, so segmentation offload must be off.

        With TSO/GSO one "packet" is a super-packet of up to 64 KB; losing,
        duplicating, corrupting or reordering it would hit dozens of TCP
        segments at once. Jitter that keeps order may stay on super-packets:
        consecutive segments leave in order anyway, at most microseconds apart.
        """
        return bool(self.reorder or self.loss or self.duplicate or self.corrupt)


@dataclass(frozen=True)
class NetemQdisc:
    """A netem qdisc: under HTB class ``1:parent_minor``, or at the root when 0.

    ``limit`` in packets; ``rate`` in bytes/s (0 = none) is set when jitter
    must keep packet order: netem then schedules each packet after the one
    before it.
    """

    device: str
    parent_minor: int
    impairment: Impairment
    limit: int
    rate: int = 0


@dataclass(frozen=True)
class DelayEngine:
    """The vnic delay engine of one vNIC (no netem on this kernel).

    It moves VM egress from ``port`` to ``relay`` and VM ingress from
    ``relay`` to ``port``, holding and dropping packets as each direction's
    impairment says; the rate is then applied on the device it writes to.
    """

    port: str
    relay: str
    egress: Impairment | None
    ingress: Impairment | None


@dataclass(frozen=True)
class U32Match:
    """One 32-bit key: ``(packet word at OFFSET) & MASK == VALUE`` (network byte order)."""

    value: int
    mask: int
    offset: int


@dataclass(frozen=True)
class ClassifierFilter:
    """A u32 filter on the HTB root: packets matching all keys go to class ``1:MINOR``.

    ``protocol`` is the EtherType the filter applies to (0x0800 IPv4, 0x86dd IPv6).
    """

    device: str
    prio: int
    protocol: int
    matches: tuple[U32Match, ...]
    class_minor: int


@dataclass(frozen=True)
class Redirect:
    """Ingress qdisc on ``device`` and a match-all u32 filter redirecting to ``target``."""

    device: str
    target: str


@dataclass(frozen=True)
class Sysctl:
    """A sysctl inside the VM's network namespace, e.g. ``net.ipv4.tcp_sack = 1``."""

    key: str
    value: str


@dataclass(frozen=True)
class Identity:
    """Who may send from a port: the VM's MAC and addresses, and its owner tag."""

    mac: str
    ipv4: str
    ipv6: str
    tag: str

    @property
    def link_local(self) -> str:
        """The VM's IPv6 link-local address (see :func:`eui64_link_local`)."""
        return eui64_link_local(self.mac)


def eui64_link_local(mac: str) -> str:
    """``fe80::/64`` with the modified EUI-64 interface id of ``mac`` (RFC 4291 appendix A):
    the link-local address a Linux interface (netns VM or QEMU guest, with the kernel's
    default ``addr_gen_mode`` 0) gives itself when it comes up with that MAC."""
    octets = bytes.fromhex(mac.replace(":", ""))
    iid = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:6]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + iid))


@dataclass(frozen=True)
class PortGuard:
    """nftables rules (bridge family, prerouting) for frames entering from ``port``.

    Frames whose Ethernet source, ARP sender or IP source is not the VM's are
    dropped and counted, as are VLAN-tagged frames, IPv6 router advertisements
    and redirects, and neighbour discovery claiming another address or MAC
    (:func:`vnic.dataplane.nft.guard_rules`); then the IP DSCP is rewritten when
    ``dscp_mark`` is set.
    """

    port: str
    chain: str
    identity: Identity
    dscp_mark: int | None = None


@dataclass(frozen=True)
class DirectionPlan:
    """Shaping of one direction: on ``device`` (None = this direction is not shaped)."""

    direction: str
    device: str | None = None
    root: HtbRoot | None = None
    classes: tuple[HtbClass, ...] = ()
    leaves: tuple[LeafQueue, ...] = ()
    filters: tuple[ClassifierFilter, ...] = ()
    netem: tuple[NetemQdisc, ...] = ()

    @property
    def shaped(self) -> bool:
        return self.root is not None or bool(self.netem)


@dataclass(frozen=True)
class Plan:
    """Everything one vNIC needs on the host side and inside the VM."""

    devices: Devices
    egress: DirectionPlan
    ingress: DirectionPlan
    redirect: Redirect | None = None
    guard: PortGuard | None = None
    sysctls: tuple[Sysctl, ...] = ()
    congestion_control: str | None = None
    engine: DelayEngine | None = None

    @property
    def impairments(self) -> tuple[Impairment, ...]:
        """Every direction's impairment, whichever engine carries it."""
        if self.engine is not None:
            return tuple(i for i in (self.engine.egress, self.engine.ingress) if i)
        seen = {q.impairment.direction: q.impairment for d in self.directions() for q in d.netem}
        return tuple(seen.values())

    def directions(self) -> tuple[DirectionPlan, DirectionPlan]:
        return (self.egress, self.ingress)
