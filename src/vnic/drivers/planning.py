"""What a host-side vNIC can honour, and what a request compiles to on this host.

The netns and qemu drivers build the same host side (:mod:`vnic.drivers.hostside`):
their capabilities come from the same kernel probe, and a request's plan is
compiled the same way, with the engine (netem or the vnic delay engine) chosen
here for the host and the profile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass

from vnic.dataplane.probe import Probe, netem_available
from vnic.errors import InvalidInput
from vnic.model.launch import MAX_NICS, PRIMARY_NIC, Capabilities, LaunchRequest
from vnic.model.profile import Profile
from vnic.plan import names
from vnic.plan.compile import ENGINES, compile_plan, impaired
from vnic.plan.model import Devices, Identity, Plan

#: The kind :func:`capabilities_from_probe` reports (the netns driver's).
KIND = "netns"
#: Profile fields this driver honours today; the others name what they need.
HONOURED = frozenset(
    {
        "egress.rate",
        "ingress.rate",
        "qos.egress",
        "qos.ingress",
        "tcp.congestion_control",
        "tcp.window_scaling",
        "tcp.sack",
        "tcp.timestamps",
        "tcp.ecn",
        "egress.dscp_mark",
    }
)
#: Fields carried by netem or the vnic delay engine.
IMPAIRMENTS = frozenset(
    f"{d}.{f}"
    for d in ("egress", "ingress")
    for f in ("delay", "jitter", "reorder", "loss", "duplicate", "corrupt")
)
_LATER = {
    "egress.peak": "a tbf peak-rate leaf (not built yet)",
    "ingress.peak": "a tbf peak-rate leaf (not built yet)",
}


#: Kernel features each honoured field needs (see :mod:`vnic.dataplane.probe`).
_NEEDS = {
    **{
        f"{d}.rate": (
            "qdisc:htb",
            "qdisc:bfifo",
            "qdisc:ingress",
            "classifier:u32",
            "action:mirred",
            "link:ifb",
        )
        for d in ("egress", "ingress")
    },
    **{f"qos.{d}": ("qdisc:htb", "classifier:u32") for d in ("egress", "ingress")},
    "egress.dscp_mark": ("nft:bridge_dscp",),
    "tcp.congestion_control": ("sysctl:net.ipv4.tcp_congestion_control",),
    "tcp.window_scaling": ("sysctl:net.ipv4.tcp_window_scaling",),
    "tcp.sack": ("sysctl:net.ipv4.tcp_sack",),
    "tcp.timestamps": ("sysctl:net.ipv4.tcp_timestamps",),
    "tcp.ecn": ("sysctl:net.ipv4.tcp_ecn",),
}


def capabilities_from_probe(probe: Probe) -> Capabilities:
    """What the netns driver can honour on the probed kernel, and what is missing (the qemu
    driver, whose host side is the same, reports these fields under its own kind)."""
    fields = set()
    missing = dict(_LATER)
    for path in HONOURED:
        absent = [f for f in _NEEDS.get(path, ()) if not probe.has(f)]
        if absent:
            missing[path] = "kernel features " + ", ".join(absent)
        else:
            fields.add(path)
    if probe.has("qdisc:netem") or probe.has("engine:delayd"):
        fields |= IMPAIRMENTS
    else:
        for path in IMPAIRMENTS:
            missing[path] = (
                "netem (missing on this kernel) or the vnic delay engine "
                "(needs a C compiler, ethtool and packet sockets)"
            )
    return Capabilities(KIND, frozenset(fields), missing)


@dataclass(frozen=True)
class EngineChoice:
    """Which engine carries delay and loss on this host, and why."""

    engine: str
    reason: str


def choose_engine(probe: Probe | None = None, profile: Profile | None = None) -> EngineChoice:
    """netem where the kernel has it, else the vnic delay engine; ``VNIC_ENGINE`` forces one.

    One exception: egress duplication goes to the delay engine even where
    netem exists. netem duplicating on the IFB that VM egress is redirected
    to crashes Linux 6.1 (skb_under_panic in the bridge, seen in the
    stock-kernel guest), so vnic never configures it.
    """
    forced = os.environ.get("VNIC_ENGINE", "").strip()
    if forced:
        if forced not in ENGINES:
            raise InvalidInput.one("VNIC_ENGINE", forced, "one of " + ", ".join(ENGINES))
        return EngineChoice(forced, "forced by VNIC_ENGINE")
    has_netem = probe.has("qdisc:netem") if probe is not None else netem_available()
    if not has_netem:
        return EngineChoice(
            "delayd", "the kernel has no sch_netem: the vnic delay engine runs instead"
        )
    if profile is not None and profile.egress.duplicate and profile.egress.duplicate.value:
        return EngineChoice(
            "delayd",
            "egress.duplicate: netem duplicating on the egress IFB crashes Linux 6.1, "
            "so the vnic delay engine carries this vNIC",
        )
    return EngineChoice("netem", "the kernel has sch_netem")


#: How many vNICs a VM of each host-side kind may have, and why no more.
MAX_NICS_OF = {
    "netns": (
        MAX_NICS,
        f"a VM's vNICs are eth0..eth{MAX_NICS - 1}, each a veth with its own shaping and guard",
    ),
    "qemu": (
        MAX_NICS,
        f"a guest's vNICs are eth0..eth{MAX_NICS - 1}, each a virtio NIC on a tap of its own",
    ),
}


def capabilities(kind: str, probe: Probe | None) -> Capabilities:
    """What a host-side driver of ``kind`` honours: from ``probe`` when there is one, else
    every field it can build (the kernel is not asked); how many vNICs from
    :data:`MAX_NICS_OF` (one for a kind it does not list)."""
    caps = (
        capabilities_from_probe(probe)
        if probe is not None
        else Capabilities(KIND, HONOURED | IMPAIRMENTS, _LATER)
    )
    most, why = MAX_NICS_OF.get(kind, (1, "the driver builds one vNIC per VM"))
    return Capabilities(kind, caps.fields, caps.missing, max_nics=most, max_nics_why=why)


def plan_for(request: LaunchRequest, probe: Probe | None = None) -> Plan:
    """The host-side plan of ``request``'s first vNIC (of a one-vNIC slice from
    :meth:`LaunchRequest.per_nic`: its only one): its profile compiled for the links,
    owner tag and seed of the vNIC's unit and its network's bridge, with the engine
    :func:`choose_engine` picks when the profile impairs.

    The VM's TCP settings (sysctls, congestion control) are per VM and come from
    ``eth0``'s profile: the plan of any other vNIC has none.
    """
    unit = request.unit
    links = names.VmLinks.of(unit)
    identity = Identity(
        mac=str(request.mac),
        ipv4=str(request.ipv4.ip),
        ipv6=str(request.ipv6.ip),
        tag=names.owner_tag(request.session, unit),
    )
    engine = choose_engine(probe, request.profile).engine if impaired(request.profile) else None
    bridge = names.bridge_of(request.network)
    devices = Devices(port=links.port, ifb=links.ifb, bridge=bridge)
    if engine == "delayd":
        devices = Devices(links.port, links.ifb, links.relay, links.relay_port, bridge)
    plan = compile_plan(
        request.profile,
        devices,
        identity,
        engine=engine,
        seed=default_seed(request.session, unit),
    )
    if request.nic != PRIMARY_NIC:
        plan = dataclasses.replace(plan, sysctls=(), congestion_control=None)
    return plan


def plans_for(request: LaunchRequest, probe: Probe | None = None) -> list[Plan]:
    """The plan of each vNIC of ``request``, in order (see :func:`plan_for`)."""
    return [plan_for(one, probe) for one in request.per_nic()]


def default_seed(session: str, unit: str) -> int:
    """The seed a vNIC's random choices use when its profile sets none: stable per session
    and unit (the VM's name for ``eth0``, so a VM keeps the seed it had)."""
    digest = hashlib.sha256(names.owner_tag(session, unit).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def egress_per_packet(plan: Plan) -> bool:
    """Whether a per-packet impairment acts on the VM's egress (its offloads must be off)."""
    return any(i.per_packet and i.direction == "egress" for i in plan.impairments)
