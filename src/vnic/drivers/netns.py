"""The netns driver: a VM is a network namespace on its session's bridge.

Launch = session namespace and bridge (if new) -> VM namespace -> veth into
the bridge + IFB -> addresses -> TCP settings -> compiled plan applied on the
host side -> read back. Any failure removes what this launch created and
re-raises.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Sequence

from vnic.dataplane import names, nft
from vnic.dataplane import namespaces as nsops
from vnic.dataplane.probe import Probe
from vnic.dataplane.tc import apply_plan, verify
from vnic.drivers.base import Capabilities, LaunchRequest, check_supported
from vnic.errors import Conflict, DataplaneError
from vnic.plan.compile import compile_plan, guard_chain
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
_LATER = {
    **{
        f"{d}.{f}": "netem or the vnic delay engine (latency and loss issue)"
        for d in ("egress", "ingress")
        for f in ("delay", "jitter", "reorder", "loss", "duplicate", "corrupt")
    },
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
    if not probe.has("qdisc:netem"):
        for path, why in _LATER.items():
            if why.startswith("netem"):
                missing[path] = (
                    "netem (missing on this kernel) or the vnic delay engine (latency and loss issue)"
                )
    return Capabilities(NetnsDriver.kind, frozenset(fields), missing)


class NetnsDriver:
    kind = "netns"

    def __init__(self, probe: Probe | None = None) -> None:
        self.probe = probe

    def capabilities(self) -> Capabilities:
        if self.probe is not None:
            return capabilities_from_probe(self.probe)
        return Capabilities(self.kind, HONOURED, _LATER)

    def plan_for(self, request: LaunchRequest) -> Plan:
        links = names.VmLinks.of(request.vm)
        identity = Identity(
            mac=str(request.mac),
            ipv4=str(request.ipv4.ip),
            ipv6=str(request.ipv6.ip),
            tag=names.owner_tag(request.session, request.vm),
        )
        return compile_plan(request.profile, Devices(port=links.port, ifb=links.ifb), identity)

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
            )
            guard = nft.start_guard(session_ns, plan.guard) if plan.guard else None
            try:
                self._tcp(vm_ns, plan, [request.ipv4.network, request.ipv6.network])
                with nsops.opened(session_ns) as ns:
                    apply_plan(ns, plan)
                    verify(ns, plan)
            finally:
                if guard is not None:
                    guard.wait()  # reaped even when the work above failed
        except BaseException:
            self.destroy(request.session, request.vm)
            raise

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
        nsops.remove(names.vm_netns(session, vm))
        port = names.VmLinks.of(vm).port
        nft.remove_guard(session_ns, guard_chain(port), names.owner_tag(session, vm))
        nsops.unplug_vm(session_ns, session, vm)

    def drop_counters(self, session: str, vm: str) -> dict[str, int]:
        """Frames from the VM dropped on the host side, by reason (spoof-mac, spoof-ipv4, ...)."""
        return nft.drop_counters(
            names.session_netns(session), guard_chain(names.VmLinks.of(vm).port)
        )

    def teardown_session(self, session: str, vms: Sequence[str] = ()) -> None:
        for vm in sorted({*vms, *self.running(session)}):
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
