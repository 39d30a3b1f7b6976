"""The VM side of a netns VM: a network namespace with an init, on its session's bridge.

Plug = the VM's namespace, its init (:mod:`vnic.dataplane.vminit`: the VM's
processes get their own PID, mount and UTS namespaces; started at once and
waited for at the end of the launch) and per vNIC a veth (``eth0``, ``eth1``...
inside) into its network's bridge with its MAC and addresses; then the TCP
settings (per VM, from ``eth0``'s plan, the congestion control on every vNIC's
routes) and each vNIC's egress offloads inside the namespace. Drift reads each
vNIC's interface, its addresses, the routes' congestion control and the
sysctls back (:func:`vnic.dataplane.drift.vm_side_drift`).
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Sequence

from vnic.dataplane import namespaces as nsops
from vnic.dataplane import vminit
from vnic.dataplane.capture import capture
from vnic.dataplane.drift import vm_side_drift
from vnic.dataplane.inventory import is_namespace, vm_namespaces, vm_namespaces_by_session
from vnic.drivers.planning import egress_per_packet
from vnic.drivers.vmside import VmSide
from vnic.errors import Conflict, DataplaneError
from vnic.model.command import ExecResult
from vnic.model.fields import DEFAULT_MTU
from vnic.model.launch import LaunchRequest
from vnic.plan import names
from vnic.plan.model import Plan

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class NetnsVm(VmSide):
    kind = "netns"
    adopts_leftovers = True

    def __init__(self) -> None:
        #: Inits started by :meth:`plug`, collected by :meth:`wait_ready` (or abandoned
        #: by :meth:`remove` when the launch fails before).
        self._starting: dict[tuple[str, str], vminit.Starting] = {}

    def present(self, session: str, vm: str) -> bool:
        """Whether the VM's namespace is mounted."""
        return is_namespace(names.vm_netns(session, vm))

    def exists(self, session: str, vm: str) -> bool:
        return nsops.exists(names.vm_netns(session, vm)) or vminit.run_dir(session, vm).is_dir()

    def thing(self, session: str, vm: str) -> str:
        return f"namespace {names.vm_netns(session, vm)}"

    def plug(self, request: LaunchRequest, plans: Sequence[Plan]) -> None:
        """Namespace, init, and per vNIC a veth into its network's bridge with its MAC and
        addresses, with its IFB or relay."""
        vm_ns = names.vm_netns(request.session, request.vm)
        nsops.create(vm_ns)
        # The init starts now and is waited for at the end (wait_ready): its start-up
        # overlaps the rest of the launch, which does not need it.
        self._starting[(request.session, request.vm)] = vminit.start(
            request.session,
            request.vm,
            vm_ns,
            [a for n in request.nics for a in (n.ipv4, n.ipv6)],
        )
        for one, plan in zip(request.per_nic(), plans, strict=True):
            nsops.plug_vm(
                names.session_netns(request.session),
                vm_ns,
                request.session,
                one.unit,
                str(one.mac),
                [one.ipv4, one.ipv6],
                relay=plan.engine is not None,
                ifname=one.nic,
                bridge=plan.devices.bridge,
            )
            _link_mtu(request.session, vm_ns, one)

    def settings(self, request: LaunchRequest, plans: Sequence[Plan]) -> None:
        """The TCP settings (``eth0``'s plan's, on every vNIC's routes) and each vNIC's
        egress offloads inside the VM, at launch."""
        vm_ns = names.vm_netns(request.session, request.vm)
        tcp_settings(vm_ns, plans[0], routes_of(request))
        for one, plan in zip(request.per_nic(), plans, strict=True):
            if egress_per_packet(plan):
                self.set_offloads(one, on=False)

    def wait_ready(self, request: LaunchRequest) -> None:
        """Wait until the init has set up the VM's processes' namespaces (its network is
        ready when made)."""
        starting = self._starting.pop((request.session, request.vm), None)
        if starting is not None:
            vminit.finish(starting)
        elif not vminit.running(request.session, request.vm):
            raise DataplaneError(f"the init of VM {request.session}/{request.vm} is not running")

    def set_offloads(self, request: LaunchRequest, *, on: bool) -> None:
        nsops.set_offloads(names.vm_netns(request.session, request.vm), request.nic, on=on)

    def set_sysctl(self, request: LaunchRequest, key: str, value: str) -> None:
        nsops.sysctl(names.vm_netns(request.session, request.vm), key, value)

    def set_congestion_control(self, request: LaunchRequest, algo: str | None) -> None:
        congestion_control(names.vm_netns(request.session, request.vm), algo, routes_of(request))

    def remove(self, session: str, vm: str) -> None:
        """Stop the init, and with it every process of the VM; then remove the namespace,
        and with it eth0 and the port; then the run directory."""
        starting = self._starting.pop((session, vm), None)
        if starting is not None:  # a launch that failed before its end
            vminit.abandon(starting)
        vminit.stop(session, vm)
        nsops.remove(names.vm_netns(session, vm))
        vminit.remove_run_dir(session, vm)

    def drift(self, request: LaunchRequest, plans: Sequence[Plan]) -> list[str]:
        problems = []
        if not vminit.running(request.session, request.vm):
            problems.append(
                f"init of VM {request.session}/{request.vm}: expected running, found not running"
            )
        return problems + vm_side_drift(
            names.vm_netns(request.session, request.vm), request, plans[0]
        )

    def vms(self, only: str | None = None) -> dict[str, set[str]]:
        """VM namespaces (mounted or not) and init run directories."""
        out = vm_namespaces_by_session(only)
        for session, vms in vminit.run_dirs().items():
            if only in (None, session):
                out.setdefault(session, set()).update(vms)
        return out

    def running(self, session: str) -> list[str]:
        found = (names.parse_vm_netns(n, session) for n in nsops.listing())
        return sorted(v for v in found if v)

    def every_vm(self) -> list[tuple[str, str]]:
        return vm_namespaces()

    def exec(
        self, session: str, vm: str, argv: Sequence[str], **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the VM (its network, PID, mount and UTS namespaces), to completion;
        ``kwargs`` as for :func:`subprocess.run`. :class:`Conflict` if the VM does not run."""
        return nsops.run(self._running(session, vm), argv, **kwargs)

    def exec_captured(
        self, session: str, vm: str, argv: Sequence[str], *, timeout: float, max_output: int
    ) -> ExecResult:
        """Run ``argv`` in the VM as :meth:`exec` does, without a terminal (stdin empty), its
        output captured and its process group killed at ``timeout``
        (:func:`vnic.dataplane.capture.capture`)."""
        proc = nsops.popen(
            self._running(session, vm),
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        return capture(proc, timeout=timeout, max_output=max_output)

    @staticmethod
    def _running(session: str, vm: str) -> str:
        """The VM's namespace; :class:`Conflict` if the VM does not run."""
        vm_ns = names.vm_netns(session, vm)
        if not nsops.exists(vm_ns):
            raise Conflict(f"VM {session}/{vm} is not running")
        if not vminit.running(session, vm):
            raise Conflict(
                f"VM {session}/{vm} has no running init (killed: drift, which repair relaunches)"
            )
        return vm_ns


#: A route of a VM's own: a vNIC's subnet and the vNIC's interface.
Route = tuple[Network, str]


def routes_of(request: LaunchRequest) -> list[Route]:
    """The subnet routes of every vNIC of the VM (IPv4 and IPv6, on its interface)."""
    return [(net, n.name) for n in request.nics for net in (n.ipv4.network, n.ipv6.network)]


def tcp_settings(vm_ns: str, plan: Plan, routes: Sequence[Route]) -> None:
    """The plan's TCP sysctls and congestion control (on every route of ``routes``) in the
    VM's namespace."""
    for s in plan.sysctls:
        nsops.sysctl(vm_ns, s.key, s.value)
    if plan.congestion_control is not None:
        congestion_control(vm_ns, plan.congestion_control, routes)


def congestion_control(vm_ns: str, algo: str | None, routes: Sequence[Route]) -> None:
    """``algo`` for the VM's TCP; None: the host's default, and no per-route choice."""
    if algo is None:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            host_default = f.read().strip()  # this thread is in the host's namespace
        nsops.sysctl(vm_ns, "net.ipv4.tcp_congestion_control", host_default)
        for net, device in routes:
            nsops.set_route_congctl(vm_ns, net, None, device)
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
    for net, device in routes:
        nsops.set_route_congctl(vm_ns, net, algo, device)


#: Bytes: the smallest MTU a vNIC's links are set to (IPv6's minimum; below it the
#: kernel takes the link's IPv6 addresses away).
MIN_LINK_MTU = 1280


def _link_mtu(session: str, vm_ns: str, one: LaunchRequest) -> None:
    """Both ends of the vNIC's veth at the profile's ``mtu`` when it is not the default
    (1500, the kernel's own) and at least :data:`MIN_LINK_MTU`: a network carried over
    VXLAN between hosts needs room for the overlay's header (docs/overlay.md)."""
    mtu = one.profile.mtu.value
    if mtu == DEFAULT_MTU.value or mtu < MIN_LINK_MTU:
        return
    port = names.VmLinks.of(one.unit).port
    for ns_name, ifname in ((names.session_netns(session), port), (vm_ns, one.nic)):
        with nsops.opened(ns_name) as ns:
            ns.link("set", index=nsops.link_index(ns, ifname), mtu=mtu)
