"""The plan: a pure, declarative description of the kernel state one vNIC needs.

A :class:`Plan` is compiled from an effective profile (see
:mod:`vnic.plan.compile`) and applied by :mod:`vnic.dataplane`. It names
devices by role, not by kernel index, so the same plan can be pointed at a
netns veth or a QEMU tap. All rates are in bytes per second and all sizes in
bytes, as the kernel takes them.
"""

from __future__ import annotations

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
    redirected to and shaped on.
    """

    port: str
    ifb: str


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


@dataclass(frozen=True)
class PortGuard:
    """nftables rules (bridge family, prerouting) for frames entering from ``port``.

    Frames whose Ethernet source, ARP sender or IP source is not the VM's are
    dropped and counted; then the IP DSCP is rewritten when ``dscp_mark`` is set.
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

    @property
    def shaped(self) -> bool:
        return self.root is not None


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

    def directions(self) -> tuple[DirectionPlan, DirectionPlan]:
        return (self.egress, self.ingress)
