"""The netns driver: a VM is a network namespace on its session's bridge.

Launch = session namespace and bridge (if new) -> VM namespace -> veth into
the bridge + IFB -> addresses -> TCP settings -> compiled plan applied on the
host side -> read back. Any failure removes what this launch created and
re-raises.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from vnic.dataplane import delayd, names, nft
from vnic.dataplane import namespaces as nsops
from vnic.dataplane.probe import Probe, netem_available
from vnic.dataplane.tc import apply_netem, apply_plan, verify
from vnic.drivers.base import Capabilities, LaunchRequest, check_supported
from vnic.errors import Conflict, DataplaneError, InvalidInput
from vnic.model.profile import Profile
from vnic.plan.compile import ENGINES, compile_plan, guard_chain, impaired
from vnic.plan.model import Devices, Identity, Plan

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
    """What the netns driver can honour on the probed kernel, and what is missing."""
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
    return Capabilities(NetnsDriver.kind, frozenset(fields), missing)


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


class NetnsDriver:
    kind = "netns"

    def __init__(self, probe: Probe | None = None) -> None:
        self.probe = probe

    def capabilities(self) -> Capabilities:
        if self.probe is not None:
            return capabilities_from_probe(self.probe)
        return Capabilities(self.kind, HONOURED | IMPAIRMENTS, _LATER)

    def plan_for(self, request: LaunchRequest) -> Plan:
        links = names.VmLinks.of(request.vm)
        identity = Identity(
            mac=str(request.mac),
            ipv4=str(request.ipv4.ip),
            ipv6=str(request.ipv6.ip),
            tag=names.owner_tag(request.session, request.vm),
        )
        engine = (
            choose_engine(self.probe, request.profile).engine if impaired(request.profile) else None
        )
        devices = Devices(port=links.port, ifb=links.ifb)
        if engine == "delayd":
            devices = Devices(links.port, links.ifb, links.relay, links.relay_port)
        return compile_plan(
            request.profile,
            devices,
            identity,
            engine=engine,
            seed=default_seed(request.session, request.vm),
        )

    def launch(self, request: LaunchRequest) -> None:
        check_supported(self.capabilities(), request.values)
        session_ns = names.session_netns(request.session)
        vm_ns = names.vm_netns(request.session, request.vm)
        if nsops.exists(vm_ns):
            raise Conflict(
                f"VM {request.session}/{request.vm} is already running (namespace {vm_ns})"
            )
        plan = self.plan_for(request)
        nsops.ensure_session(session_ns, request.session)
        nsops.create(vm_ns)
        try:
            nsops.plug_vm(
                session_ns,
                vm_ns,
                request.session,
                request.vm,
                str(request.mac),
                [request.ipv4, request.ipv6],
                relay=plan.engine is not None,
            )
            guard = nft.start_guard(session_ns, plan.guard) if plan.guard else None
            try:
                self._tcp(vm_ns, plan, [request.ipv4.network, request.ipv6.network])
                self._offloads(session_ns, vm_ns, plan)
                with nsops.opened(session_ns) as ns:
                    apply_plan(ns, plan)
                    verify(ns, plan)
                apply_netem(session_ns, plan)
                if plan.engine is not None:
                    delayd.start(session_ns, request.session, request.vm, plan.engine)
            finally:
                if guard is not None:
                    guard.wait()  # reaped even when the work above failed
        except BaseException:
            self.destroy(request.session, request.vm)
            raise

    def _offloads(self, session_ns: str, vm_ns: str, plan: Plan) -> None:
        """Segmentation offload off where per-packet decisions are made (see Impairment.per_packet).

        VM egress is segmented by the VM's own interface. VM ingress: with the
        engine, by the bridge's transmit to the relay; netem sits on the port
        itself, where frames from other VMs still arrive as super-packets.
        """
        for imp in plan.impairments:
            if not imp.per_packet:
                continue
            if imp.direction == "egress":
                nsops.set_offloads(vm_ns, names.VM_IFNAME, on=False)
            elif plan.engine is not None:
                nsops.set_offloads(session_ns, plan.devices.relay_port, on=False)

    def _tcp(
        self,
        vm_ns: str,
        plan: Plan,
        networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
    ) -> None:
        for s in plan.sysctls:
            nsops.sysctl(vm_ns, s.key, s.value)
        algo = plan.congestion_control
        if algo is None:
            return
        allowed = nsops.read_sysctl(vm_ns, "net.ipv4.tcp_allowed_congestion_control").split()
        available = nsops.read_sysctl(vm_ns, "net.ipv4.tcp_available_congestion_control").split()
        if algo not in available:
            raise DataplaneError(
                f"tcp.congestion_control {algo!r} is not available in this kernel (available: {' '.join(available)})"
            )
        if algo in allowed:
            nsops.sysctl(vm_ns, "net.ipv4.tcp_congestion_control", algo)
        # The namespace default may only pick from the host's allowed list; a
        # per-route congctl reaches every available algorithm, so set it on
        # the session's routes either way.
        for net in networks:
            nsops.set_route_congctl(vm_ns, net, algo)

    def destroy(self, session: str, vm: str) -> None:
        session_ns = names.session_netns(session)
        delayd.stop(session, vm)
        nsops.remove(names.vm_netns(session, vm))
        links = names.VmLinks.of(vm)
        for port in (links.port, links.relay_port):
            nft.remove_guard(session_ns, guard_chain(port), names.owner_tag(session, vm))
        nsops.unplug_vm(session_ns, session, vm)

    def engines_in_use(self) -> list[dict[str, object]]:
        """Every running VM on this host, what carries its delay and loss and why, with counters."""
        host = choose_engine(self.probe)
        netem_by_session: dict[str, set[str]] = {}  # one qdisc dump per session, not per VM
        report: list[dict[str, object]] = []
        for ns_name in nsops.listing():
            parts = ns_name.split(".")
            if len(parts) != 3 or parts[0] != names.PREFIX:
                continue
            session, vm = parts[1], parts[2]
            stats = delayd.read_stats(session, vm)
            links = names.VmLinks.of(vm)
            detail: dict[str, object]
            if stats is not None:
                why = (
                    host.reason
                    if host.engine == "delayd"
                    else ("egress.duplicate: netem duplicating on the egress IFB crashes Linux 6.1")
                )
                engine, detail = (
                    "delayd",
                    {
                        "why": why,
                        "pid": stats.pid,
                        "cpu_seconds": stats.cpu_seconds,
                        "counters": stats.directions,
                    },
                )
            elif {links.port, links.ifb} & self._netem_in(session, netem_by_session):
                engine, detail = "netem", {"why": host.reason}
            else:
                engine, detail = "none", {"why": "its profile has no delay or loss"}
            report.append({"session": session, "vm": vm, "engine": engine, **detail})
        return report

    @staticmethod
    def _netem_in(session: str, seen: dict[str, set[str]]) -> set[str]:
        if session not in seen:
            seen[session] = _netem_devices(names.session_netns(session))
        return seen[session]

    def engine_stats(self, session: str, vm: str) -> delayd.EngineStats | None:
        """Counters of the VM's delay engine, or None when it has none."""
        return delayd.read_stats(session, vm)

    def drop_counters(self, session: str, vm: str) -> dict[str, int]:
        """Frames from the VM dropped on the host side, by reason (spoof-mac, spoof-ipv4, ...)."""
        session_ns = names.session_netns(session)
        links = names.VmLinks.of(vm)
        port = links.relay_port if delayd.running(session, vm) else links.port
        return nft.drop_counters(session_ns, guard_chain(port))

    def teardown_session(self, session: str, vms: Sequence[str] = ()) -> None:
        for vm in sorted({*vms, *self.running(session), *delayd.recorded(session)}):
            self.destroy(session, vm)
        nsops.remove(names.session_netns(session))

    def running(self, session: str) -> list[str]:
        found = (names.parse_vm_netns(n, session) for n in nsops.listing())
        return sorted(v for v in found if v)

    def exec(
        self, session: str, vm: str, argv: Sequence[str], **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        vm_ns = names.vm_netns(session, vm)
        if not nsops.exists(vm_ns):
            raise Conflict(f"VM {session}/{vm} is not running")
        return nsops.run(vm_ns, argv, **kwargs)


def default_seed(session: str, vm: str) -> int:
    """The seed a VM's random choices use when its profile sets none: stable per session and VM."""
    digest = hashlib.sha256(names.owner_tag(session, vm).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def _netem_devices(session_ns: str) -> set[str]:
    """Devices in ``session_ns`` with a netem qdisc."""
    if not nsops.exists(session_ns):
        return set()
    proc = nsops.run_inside(
        session_ns, ["tc", "-j", "qdisc", "show"], capture_output=True, timeout=30
    )
    if proc.returncode != 0:
        return set()
    return {str(q["dev"]) for q in json.loads(proc.stdout or "[]") if q.get("kind") == "netem"}
