"""The netns driver: a VM is a network namespace on its session's bridge.

Launch = session namespace and bridge (if new) -> VM namespace and its init
(:mod:`vnic.dataplane.vminit`: the VM's processes get their own PID, mount and
UTS namespaces; waited for at the end) -> veth into the bridge + IFB ->
addresses -> TCP settings -> compiled plan applied on the host side -> read
back. Any failure removes what this launch created and re-raises.

For a host agent that restarts (possibly after SIGKILL in the middle of a
launch): :meth:`NetnsDriver.inventory` finds every VM with anything on the
host, by name or owner tag; :meth:`NetnsDriver.drift` reads one VM's state
back and names each difference from what launch builds
(:meth:`NetnsDriver.drift_many` for many VMs, reading each session once); and
:meth:`NetnsDriver.destroy` removes whatever a killed launch left.

Live change (:meth:`NetnsDriver.reconfigure`, :meth:`NetnsDriver.reconfigure_many`):
both plans compiled, their difference (:mod:`vnic.plan.diff`) applied in place
in the session namespace, the delay engine's parameters swapped without a
restart, TCP settings set in the VM. A structural change rebuilds the host side
only; the VM's namespace, ``eth0`` and processes stay.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from vnic.dataplane import delayd, nft, qemu, vminit
from vnic.dataplane import namespaces as nsops
from vnic.dataplane.probe import Probe, netem_available
from vnic.dataplane.tc import (
    ClassState,
    LiveTc,
    apply_netem,
    apply_plan,
    compare_classes,
    compare_qdiscs,
    read_classes_at,
    read_qdiscs,
    verify,
)
from vnic.errors import Conflict, DataplaneError, InvalidInput, VnicError
from vnic.model.launch import Capabilities, LaunchRequest, check_supported
from vnic.model.profile import Profile
from vnic.plan import diff, names
from vnic.plan.compile import ENGINES, compile_plan, guard_chain, impaired
from vnic.plan.model import Devices, Identity, Plan

#: ``IFF_UP`` in a link's flags.
IFF_UP = 0x1
#: The main routing table, where the VM's routes are.
RT_TABLE_MAIN = 254
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
        #: Inits started by :meth:`launch_begin`, collected by :meth:`launch_finish`.
        self._starting: dict[tuple[str, str], vminit.Starting] = {}

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
        self.launch_begin(request)
        try:
            self.launch_finish(request)
        except BaseException:
            self.destroy(request.session, request.vm)
            raise

    def launch_begin(self, request: LaunchRequest) -> None:
        """Everything of a launch that touches the session's shared objects (bridge, nft
        table): the agent runs this under the session's lock, and :meth:`launch_finish`
        (the wait for a guest to boot) outside it, so launches in one session overlap.
        On failure nothing is left and the error is raised."""
        check_supported(self.capabilities(), request.values)
        session_ns = names.session_netns(request.session)
        if self._vm_exists(request.session, request.vm):
            raise Conflict(
                f"VM {request.session}/{request.vm} is already running "
                f"({self._vm_thing(request.session, request.vm)})"
            )
        plan = self.plan_for(request)
        nsops.ensure_session(session_ns, request.session)
        try:
            self._plug(request, plan)
            self._apply_host_side(
                session_ns, request, plan, lambda: self._vm_settings(request, plan)
            )
        except BaseException:
            self.destroy(request.session, request.vm)
            raise

    # The VM side. Here a VM is a network namespace; the qemu driver overrides these
    # to make it a guest on a tap, and shares everything on the host side.

    def _vm_present(self, session: str, vm: str) -> bool:
        """Whether the VM runs (here: its namespace is mounted)."""
        return _is_namespace(names.vm_netns(session, vm))

    def _vm_exists(self, session: str, vm: str) -> bool:
        """Whether anything of the VM itself exists, running or half-made by a killed launch."""
        return nsops.exists(names.vm_netns(session, vm)) or vminit.run_dir(session, vm).is_dir()

    def _vm_thing(self, session: str, vm: str) -> str:
        """What the VM is, in messages."""
        return f"namespace {names.vm_netns(session, vm)}"

    def _plug(self, request: LaunchRequest, plan: Plan) -> None:
        """Make the VM and its link into the session (here: namespace, veth, IFB or relay)."""
        vm_ns = names.vm_netns(request.session, request.vm)
        nsops.create(vm_ns)
        # The init starts now and is waited for at the end (launch_finish): its
        # start-up overlaps the rest of the launch, which does not need it.
        self._starting[(request.session, request.vm)] = vminit.start(
            request.session, request.vm, vm_ns, [request.ipv4, request.ipv6]
        )
        nsops.plug_vm(
            names.session_netns(request.session),
            vm_ns,
            request.session,
            request.vm,
            str(request.mac),
            [request.ipv4, request.ipv6],
            relay=plan.engine is not None,
        )

    def _vm_settings(self, request: LaunchRequest, plan: Plan) -> None:
        """The plan's TCP settings and egress offloads inside the VM, at launch."""
        vm_ns = names.vm_netns(request.session, request.vm)
        self._tcp(vm_ns, plan, [request.ipv4.network, request.ipv6.network])
        if _egress_per_packet(plan):
            self._set_vm_offloads(request, on=False)

    def launch_finish(self, request: LaunchRequest) -> None:
        """The end of a launch after :meth:`launch_begin`: wait until the VM is ready (a
        namespace VM's init has set up its processes' namespaces; its network is ready when
        made). On failure it raises and the caller destroys the VM (under the session's lock,
        as it began it)."""
        self._wait_ready(request)

    def _wait_ready(self, request: LaunchRequest) -> None:
        """Wait until the VM is ready (here: its init has set up the VM's processes'
        namespaces; its network is ready when made)."""
        starting = self._starting.pop((request.session, request.vm), None)
        if starting is not None:
            vminit.finish(starting)
        elif not vminit.running(request.session, request.vm):
            raise DataplaneError(f"the init of VM {request.session}/{request.vm} is not running")

    def _set_vm_offloads(self, request: LaunchRequest, *, on: bool) -> None:
        """TSO/GSO of the VM's own interface (VM egress is segmented there)."""
        nsops.set_offloads(names.vm_netns(request.session, request.vm), names.VM_IFNAME, on=on)

    def _set_sysctl(self, request: LaunchRequest, key: str, value: str) -> None:
        nsops.sysctl(names.vm_netns(request.session, request.vm), key, value)

    def _set_congestion_control(self, request: LaunchRequest, algo: str | None) -> None:
        self._congestion_control(
            names.vm_netns(request.session, request.vm),
            algo,
            (request.ipv4.network, request.ipv6.network),
        )

    def _remove_vm(self, session: str, vm: str) -> None:
        """Stop the VM itself (here: its init, and with it every process of the VM; then its
        namespace, and with it eth0 and the port; then its run directory)."""
        starting = self._starting.pop((session, vm), None)
        if starting is not None:  # a launch that failed before its end
            vminit.abandon(starting)
        vminit.stop(session, vm)
        nsops.remove(names.vm_netns(session, vm))
        vminit.remove_run_dir(session, vm)

    def _vm_drift(self, request: LaunchRequest, plan: Plan) -> list[str]:
        """How the VM itself differs from the request (empty: not at all)."""
        problems = []
        if not vminit.running(request.session, request.vm):
            problems.append(
                f"init of VM {request.session}/{request.vm}: expected running, found not running"
            )
        return problems + _vm_side_drift(names.vm_netns(request.session, request.vm), request, plan)

    def _vms(self, only: str | None = None) -> dict[str, set[str]]:
        """The VMs of this driver with anything on the host, by session (see :meth:`inventory`)."""
        found = _find(only)
        guests = qemu.guests()
        return {s: vms - guests.get(s, set()) for s, vms in found.items()}

    def _offloads(self, session_ns: str, plan: Plan) -> None:
        """Host-side segmentation offload off where per-packet decisions are made (see
        Impairment.per_packet): VM ingress through the engine is segmented by the bridge's
        transmit to the relay. (VM egress is segmented by the VM's own interface, see
        :meth:`_vm_settings`; netem sits on the port itself, where frames from other VMs
        still arrive as super-packets.)"""
        if plan.engine is None:
            return
        if any(i.per_packet and i.direction == "ingress" for i in plan.impairments):
            nsops.set_offloads(session_ns, plan.devices.relay_port, on=False)

    def _tcp(
        self,
        vm_ns: str,
        plan: Plan,
        networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
    ) -> None:
        for s in plan.sysctls:
            nsops.sysctl(vm_ns, s.key, s.value)
        if plan.congestion_control is not None:
            self._congestion_control(vm_ns, plan.congestion_control, networks)

    @staticmethod
    def _congestion_control(
        vm_ns: str,
        algo: str | None,
        networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
    ) -> None:
        """``algo`` for the VM's TCP; None: the host's default, and no per-route choice."""
        if algo is None:
            with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
                host_default = f.read().strip()  # this thread is in the host's namespace
            nsops.sysctl(vm_ns, "net.ipv4.tcp_congestion_control", host_default)
            for net in networks:
                nsops.set_route_congctl(vm_ns, net, None)
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

    def reconfigure(self, previous: LaunchRequest, request: LaunchRequest) -> list[str]:
        """Change the running VM from ``previous`` to ``request`` in place; return one line per
        kernel change (empty when nothing differs).

        Checked before anything is touched: the fields are supported here, the VM
        runs, and its name, MAC and addresses are the same. Then only what differs
        changes (see :mod:`vnic.plan.diff`): HTB classes and FIFO limits in place,
        filters by priority, netem by ``tc qdisc change``, the delay engine without a
        restart, the guard's rules, TCP settings inside the VM. A structural change
        (the delay engine comes or goes, a direction becomes shaped or unshaped)
        rebuilds the host side only: the VM's namespace, ``eth0``, its processes and
        their connections stay, with a brief pause in traffic. On failure the previous
        state is restored as far as possible and :class:`DataplaneError` raised.
        """
        outcome = self.reconfigure_many([(previous, request)])[(request.session, request.vm)]
        if isinstance(outcome, VnicError):
            raise outcome
        return outcome

    def reconfigure_many(
        self, pairs: Sequence[tuple[LaunchRequest, LaunchRequest]]
    ) -> dict[tuple[str, str], list[str] | VnicError]:
        """:meth:`reconfigure` of each ``(previous, request)`` pair, by ``(session, vm)``.

        A VM's failure is its outcome (the error, its previous state restored), not
        the others'. Each session namespace is entered once: one raw netlink socket
        carries the class and FIFO changes of all its VMs in one batch, each request
        acknowledged on its own.
        """
        caps = self.capabilities()
        by_session: dict[str, list[tuple[LaunchRequest, LaunchRequest]]] = {}
        out: dict[tuple[str, str], list[str] | VnicError] = {}
        for previous, request in pairs:
            by_session.setdefault(request.session, []).append((previous, request))
        for session, batch in by_session.items():
            changes = []
            for previous, request in batch:
                try:
                    changes.append(self._live_change(caps, previous, request))
                except VnicError as exc:
                    out[(request.session, request.vm)] = exc
            out.update(self._apply_live(session, changes))
        return out

    def _live_change(
        self, caps: Capabilities, previous: LaunchRequest, request: LaunchRequest
    ) -> _LiveChange:
        """Both plans and their difference, after every check that needs no change."""
        check_supported(caps, request.values)
        who = f"{request.session}/{request.vm}"
        if (previous.session, previous.vm) != (request.session, request.vm):
            raise InvalidInput.one(
                "vm", f"{previous.session}/{previous.vm}", f"the same VM as {who}"
            )
        for name in ("mac", "ipv4", "ipv6"):
            before, after = getattr(previous, name), getattr(request, name)
            if before != after:
                raise InvalidInput.one(
                    name, str(after), f"{before}, what {who} runs with (a live change keeps it)"
                )
        if not self._vm_present(request.session, request.vm):
            raise Conflict(f"VM {who} is not running")
        old, new = self.plan_for(previous), self.plan_for(request)
        return _LiveChange(previous, request, old, new, diff.diff_plans(old, new))

    def _apply_live(
        self, session: str, changes: Sequence[_LiveChange]
    ) -> dict[tuple[str, str], list[str] | VnicError]:
        """Apply the changes of one session's VMs: traffic control of all of them first (one
        batch), then per VM the engine, guard, offloads and TCP settings."""
        out: dict[tuple[str, str], list[str] | VnicError] = {}
        session_ns = names.session_netns(session)
        failed: dict[tuple[str, str], str] = {}
        todo = [c for c in changes if c.ops]
        out.update({c.key: [] for c in changes if not c.ops})
        if not todo:
            return out
        with LiveTc(session_ns) as live:
            for c in todo:
                if c.structural:
                    continue
                for op in c.ops:
                    if isinstance(op, diff.TC_OPS):
                        try:
                            live.apply(op, c.key)
                        except DataplaneError as exc:
                            failed[c.key] = str(exc)
                            break
            for key, messages in live.flush().items():
                if isinstance(key, tuple):  # labels are (session, vm)
                    failed.setdefault(key, "; ".join(messages))
            for c in todo:
                if c.key in failed:
                    continue
                try:
                    if c.structural:
                        self._rebuild_host_side(session_ns, c.request, c.old, c.new)
                    for op in c.ops:
                        if not isinstance(op, (*diff.TC_OPS, diff.RebuildHostSide)):
                            self._apply_other(session_ns, c, op)
                except (VnicError, OSError, NetlinkError, subprocess.SubprocessError) as exc:
                    failed[c.key] = str(exc)
            for c in todo:
                if c.key in failed:
                    self._restore(session_ns, live, c)
                    who = f"{c.request.session}/{c.request.vm}"
                    out[c.key] = DataplaneError(
                        f"live change of {who} failed, its previous state restored: "
                        + failed[c.key]
                    )
                else:
                    out[c.key] = [diff.describe(op) for op in c.ops]
        return out

    def _apply_other(self, session_ns: str, c: _LiveChange, op: diff.Op) -> None:
        """One operation that is not traffic control (engine, guard, offloads, TCP)."""
        if isinstance(op, diff.ChangeEngine):
            session, vm = c.request.session, c.request.vm
            if delayd.controllable(session, vm):
                delayd.update(session, vm, op.new)
            else:  # started before live changes existed: a restart is the only way
                delayd.stop(session, vm)
                delayd.start(session_ns, session, vm, op.new)
        elif isinstance(op, diff.ChangeGuard):
            nft.rewrite_guard(session_ns, op.new)
        elif isinstance(op, diff.SetOffloads):
            if op.direction == "egress":
                self._set_vm_offloads(c.request, on=op.on)
            elif c.new.engine is not None:
                nsops.set_offloads(session_ns, c.new.devices.relay_port, on=op.on)
        elif isinstance(op, diff.SetSysctl):
            self._set_sysctl(c.request, op.key, op.new)
        elif isinstance(op, diff.SetCongestionControl):
            self._set_congestion_control(c.request, op.new)

    def _rebuild_host_side(
        self, session_ns: str, request: LaunchRequest, old: Plan, new: Plan
    ) -> None:
        """Host side of ``new`` in place of ``old``'s, keeping the port (and so ``eth0``)."""
        session, vm = request.session, request.vm
        links = names.VmLinks.of(vm)
        delayd.stop(session, vm)
        for port in (links.port, links.relay_port):
            nft.remove_guard(session_ns, guard_chain(port), names.owner_tag(session, vm))
        nsops.replug_host_side(session_ns, session, vm, relay=new.engine is not None)

        def vm_offloads() -> None:
            if _egress_per_packet(old) != _egress_per_packet(new):
                self._set_vm_offloads(request, on=not _egress_per_packet(new))

        self._apply_host_side(session_ns, request, new, vm_offloads)

    def _apply_host_side(
        self,
        session_ns: str,
        request: LaunchRequest,
        plan: Plan,
        vm_step: Callable[[], None],
    ) -> None:
        """Apply ``plan`` to the VM's links (made already): the guard (started in the
        background, reaped even on failure), ``vm_step`` (the VM's own settings), host-side
        offloads, traffic control read back, netem, and the delay engine. Launch and a
        structural live change both build the host side this way."""
        guard = nft.start_guard(session_ns, plan.guard) if plan.guard else None
        try:
            vm_step()
            self._offloads(session_ns, plan)
            with nsops.opened(session_ns) as ns:
                apply_plan(ns, plan)
                verify(ns, plan)
            apply_netem(session_ns, plan)
            if plan.engine is not None:
                delayd.start(session_ns, request.session, request.vm, plan.engine)
        finally:
            if guard is not None:
                guard.wait()

    def _restore(self, session_ns: str, live: LiveTc, c: _LiveChange) -> None:
        """Put the VM back to its previous plan as far as possible (best effort, no raise)."""
        errors = (VnicError, OSError, NetlinkError, subprocess.SubprocessError)
        if c.structural:
            with contextlib.suppress(*errors):
                self._rebuild_host_side(session_ns, c.previous, c.new, c.old)
            return
        back = _LiveChange(c.request, c.previous, c.new, c.old, diff.diff_plans(c.new, c.old))
        label = ("restore", c.key)
        for op in back.ops:
            with contextlib.suppress(*errors):
                if isinstance(op, diff.TC_OPS):
                    live.apply(op, label)
                    live.flush()
                elif not isinstance(op, diff.RebuildHostSide):
                    self._apply_other(session_ns, back, op)
        live.failures.pop(label, None)

    def destroy(self, session: str, vm: str) -> None:
        """Remove everything of the VM, whatever state a killed launch (or destroy) left.

        Idempotent, and ordered so that each step still finds what it removes:
        the engine first (by its pid file, then by its owner tag for one whose
        pid was never recorded), then the VM namespace (which takes ``eth0``
        and with it the port), then the guard and the remaining links. A
        session namespace that is only a placeholder file (a launch killed
        between creating and mounting it) holds none of these, so it is
        skipped; :meth:`teardown_session` removes it.
        """
        session_ns = names.session_netns(session)
        delayd.stop(session, vm)
        _stop_untracked_engines(session, vm)
        self._remove_vm(session, vm)
        if not _is_namespace(session_ns):
            return
        links = names.VmLinks.of(vm)
        for port in (links.port, links.relay_port):
            nft.remove_guard(session_ns, guard_chain(port), names.owner_tag(session, vm))
        _unplug(session_ns, session, vm)

    def inventory(self) -> dict[str, set[str]]:
        """Every session with vnic objects on this host, mapped to the VMs that have any.

        Read-only. A VM counts when any of these exists: its namespace, its
        delay engine's process or run files, a link in the session namespace
        tagged with it (found even when the VM namespace is gone), a guard jump
        tagged with it. A session namespace without VMs maps to an empty set.
        Costs one link dump and one nft listing per session namespace and one
        scan of /proc, whatever the number of VMs.
        """
        return self._vms()

    def drift(self, request: LaunchRequest) -> list[str]:
        """How the kernel differs from what :meth:`launch` builds for ``request``, read back.

        One short sentence per difference, naming the object, what the plan
        expects and what was found; empty when nothing differs. A VM whose
        namespace is missing gives that one sentence. Read-only. For many VMs
        use :meth:`drift_many`, which reads each session namespace once.
        """
        return self.drift_many([request])[(request.session, request.vm)]

    def drift_many(self, requests: Sequence[LaunchRequest]) -> dict[tuple[str, str], list[str]]:
        """:meth:`drift` of each request, by ``(session, vm)`` (the last request wins when a
        VM is named twice). Read-only.

        Each session namespace is read once for all its VMs: one link dump, one
        qdisc dump, one listing of the nftables table, one listing of the delay
        engines' run dir; then per VM, one class dump per shaped device (the
        kernel dumps classes one device at a time) and, inside the VM's own
        namespace, one netlink socket and the sysctl files.
        """
        by_session: dict[str, list[LaunchRequest]] = {}
        for request in requests:
            by_session.setdefault(request.session, []).append(request)
        out: dict[tuple[str, str], list[str]] = {}
        for session, batch in by_session.items():
            with contextlib.ExitStack() as stack:
                view = _SessionView(session, stack)
                for request in batch:
                    out[(session, request.vm)] = self._drift(request, view)
        return out

    def _drift(self, request: LaunchRequest, view: _SessionView) -> list[str]:
        session, vm = request.session, request.vm
        missing = [f"VM {session}/{vm}: {self._vm_thing(session, vm)} expected, found missing"]
        if not self._vm_present(session, vm):
            return missing
        try:
            plan = self.plan_for(request)
            problems = self._vm_drift(request, plan)
            session_ns = names.session_netns(session)
            if not _is_namespace(session_ns):
                return [
                    *problems,
                    f"session namespace {session_ns}: expected present, found missing",
                ]
            return problems + _host_side_drift(view, vm, plan)
        except (OSError, NetlinkError, DataplaneError):
            if self._vm_present(session, vm):
                raise
            return missing  # destroyed while we looked

    def engines_in_use(self) -> list[dict[str, object]]:
        """Every running VM on this host (netns VMs and QEMU guests), what carries its delay and
        loss and why, with counters."""
        host = choose_engine(self.probe)
        netem_by_session: dict[str, set[str]] = {}  # one qdisc dump per session, not per VM
        report: list[dict[str, object]] = []
        vms = [(s, vm, "netns") for s, vm in _vm_namespaces()]
        vms += [(s, vm, "qemu") for s, guests in qemu.guests().items() for vm in guests]
        for session, vm, kind in sorted(vms):
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
            report.append(
                {"session": session, "vm": vm, "driver": kind, "engine": engine, **detail}
            )
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
        """Destroy every VM of the session that has anything on this host (and ``vms``),
        then remove the session namespace."""
        found = self._vms(session).get(session, set())
        for vm in sorted({*vms, *found}):
            self.destroy(session, vm)
        _remove_session_if_unused(session)

    def running(self, session: str) -> list[str]:
        found = (names.parse_vm_netns(n, session) for n in nsops.listing())
        return sorted(v for v in found if v)

    def exec(
        self, session: str, vm: str, argv: Sequence[str], **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the VM (its network, PID, mount and UTS namespaces), to completion;
        ``kwargs`` as for :func:`subprocess.run`. :class:`Conflict` if the VM does not run."""
        vm_ns = names.vm_netns(session, vm)
        if not nsops.exists(vm_ns):
            raise Conflict(f"VM {session}/{vm} is not running")
        if not vminit.running(session, vm):
            raise Conflict(
                f"VM {session}/{vm} has no running init (killed: drift, which repair relaunches)"
            )
        return nsops.run(vm_ns, argv, **kwargs)


@dataclass(frozen=True)
class _LiveChange:
    """One VM's live change: the requests, their plans and the operations between them."""

    previous: LaunchRequest
    request: LaunchRequest
    old: Plan
    new: Plan
    ops: list[diff.Op]

    @property
    def key(self) -> tuple[str, str]:
        return (self.request.session, self.request.vm)

    @property
    def structural(self) -> bool:
        return any(isinstance(op, diff.RebuildHostSide) for op in self.ops)


def _vm_namespaces() -> list[tuple[str, str]]:
    """(session, vm) of every VM namespace on the host."""
    out = []
    for ns_name in nsops.listing():
        parts = ns_name.split(".")
        if len(parts) == 3 and parts[0] == names.PREFIX:
            out.append((parts[1], parts[2]))
    return out


def _egress_per_packet(plan: Plan) -> bool:
    """Whether a per-packet impairment acts on the VM's egress (its offloads must be off)."""
    return any(i.per_packet and i.direction == "egress" for i in plan.impairments)


def _remove_session_if_unused(session: str) -> None:
    """Remove the session namespace, unless VMs of another driver (QEMU guests) still use it."""
    if qemu.guests().get(session):
        return
    nsops.remove(names.session_netns(session))


def default_seed(session: str, vm: str) -> int:
    """The seed a VM's random choices use when its profile sets none: stable per session and VM."""
    digest = hashlib.sha256(names.owner_tag(session, vm).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def _netem_devices(session_ns: str) -> set[str]:
    """Devices in ``session_ns`` with a netem qdisc."""
    if not nsops.exists(session_ns):
        return set()
    try:
        qdiscs = read_qdiscs(session_ns)
    except DataplaneError:
        return set()
    return {dev for dev, found in qdiscs.items() if any(k == "netem" for k, _ in found.values())}


# ----------------------------------------------------------------------------- finding and removing


def _find(only: str | None) -> dict[str, set[str]]:
    """:meth:`NetnsDriver.inventory`, of every session or of session ``only``."""
    out: dict[str, set[str]] = {}
    session_namespaces = []
    for ns_name in nsops.listing():
        owner = _parse_netns(ns_name)
        if owner is None or only not in (None, owner[0]):
            continue
        session, vm = owner
        vms = out.setdefault(session, set())
        if vm is not None:
            vms.add(vm)
        elif _is_namespace(ns_name):
            session_namespaces.append(session)
    for session in session_namespaces:
        ns_name = names.session_netns(session)
        try:
            tags = [*_link_tags(ns_name), *nft.jump_tags(ns_name)]
        except (OSError, DataplaneError):
            if _is_namespace(ns_name):
                raise
            continue  # removed while we looked (a teardown running alongside)
        out[session].update(vm for vm in (_vm_of_tag(t, session) for t in tags) if vm)
    engines = delayd.engine_processes().values()
    runs = [*delayd.run_files().items(), *vminit.run_dirs().items()]
    for session, vms in [*runs, *((s, {vm}) for s, vm in engines)]:
        if only in (None, session):
            out.setdefault(session, set()).update(vms)
    return out


def _parse_netns(name: str) -> tuple[str, str | None] | None:
    """``(session, vm)`` of a VM namespace, ``(session, None)`` of a session namespace, else None.

    The capability probe's throwaway namespaces (``vnic.probe-<pid>``,
    ``vnic.probe-netem-<pid>``) share the prefix but are not sessions: they
    belong to the probing process, which removes them itself.
    """
    parts = name.split(".")
    if len(parts) not in (2, 3) or parts[0] != names.PREFIX:
        return None
    if not all(_NAME.fullmatch(p) for p in parts[1:]):
        return None
    if len(parts) == 2 and _PROBE.fullmatch(parts[1]):
        return None
    return (parts[1], parts[2] if len(parts) == 3 else None)


#: Session and VM names (see :mod:`vnic.model.session`); anything else is not vnic's.
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_PROBE = re.compile(r"probe-(?:netem-)?\d+")


def _is_namespace(name: str) -> bool:
    """Whether /run/netns/NAME is a mounted namespace, not just the file a killed
    :func:`~vnic.dataplane.namespaces.create` made before mounting onto it (entering
    such a file fails, so nothing can be inside)."""
    try:
        return os.stat(os.path.join(nsops.RUN_DIR, name)).st_dev == _nsfs_device()
    except FileNotFoundError:
        return False


def _nsfs_device() -> int:
    """The device of the namespace file system (every namespace file is on it)."""
    return os.stat("/proc/self/ns/net").st_dev


def _vm_of_tag(tag: str, session: str) -> str | None:
    """The VM named by owner tag ``tag`` if it is one of ``session``'s VMs, else None."""
    prefix = names.owner_tag(session, "x")[:-1]
    vm = tag[len(prefix) :] if tag.startswith(prefix) else ""
    return vm if _NAME.fullmatch(vm) else None


def _link_tags(session_ns: str) -> list[str]:
    """The aliases of every link in ``session_ns``, from one dump."""
    return [link.alias for link in _session_links(session_ns).values() if link.alias is not None]


@dataclass(frozen=True)
class _Link:
    """A link of a session namespace: index, alias, whether it is up, its master's name."""

    index: int
    alias: str | None
    up: bool
    master: str | None


def _session_links(session_ns: str) -> dict[str, _Link]:
    """Every link in ``session_ns`` by name, from one dump.

    ``ip -j`` rather than a pyroute2 dump: iproute2's C decoder is much faster
    than decoding every link in Python, and a session holds up to four links
    per VM.
    """
    proc = nsops.run_inside(
        session_ns, ["ip", "-j", "link", "show"], capture_output=True, timeout=30
    )
    if proc.returncode != 0:
        raise DataplaneError(f"cannot list the links of {session_ns}: {proc.stderr.strip()}")
    return {
        str(link["ifname"]): _Link(
            index=int(link["ifindex"]),
            alias=str(link["ifalias"]) if "ifalias" in link else None,
            up="UP" in link.get("flags", []),
            master=str(link["master"]) if "master" in link else None,
        )
        for link in json.loads(proc.stdout or "[]")
    }


def _stop_untracked_engines(session: str, vm: str, grace: float = 2.0) -> None:
    """Stop engines of the VM that no pid file names (TERM, then KILL after ``grace`` s).

    A launch killed between starting the engine and recording its pid leaves
    one; it carries the VM's owner tag, which is how it is found.
    """
    victims = [pid for pid, owner in delayd.engine_processes().items() if owner == (session, vm)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while victims and time.monotonic() < deadline:
        victims = [p for p in victims if nsops.alive(p)]
        time.sleep(0.01)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _unplug(session_ns: str, session: str, vm: str) -> None:
    """Delete the VM's links in the session namespace: those tagged with it, and those
    with its names and no tag at all.

    A link gets its tag in a second netlink call after it is made, so a launch
    killed in between leaves it untagged; in vnic's own session namespace a
    link with the VM's (hash-derived) name and no alias can only be that. A
    link with the name but another VM's tag (a hash collision) is left alone.
    Deleting one end of a veth deletes the other, so an end may vanish between
    lookup and delete.
    """
    tag = names.owner_tag(session, vm)
    with nsops.opened(session_ns) as ns:
        for name in names.VmLinks.of(vm).all():
            try:
                (link,) = ns.link("get", ifname=name)
                if link.get_attr("IFLA_IFALIAS") in (tag, None, ""):
                    ns.link("del", index=link["index"])
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise DataplaneError(f"cannot delete {name} in {session_ns}: {exc}") from exc


# ----------------------------------------------------------------------------- drift


class _SessionView:
    """The host side of a session as the drift of its VMs compares with it: each part read
    once for all of them, when a VM first needs it (and again only if that read failed).

    The netlink socket for class dumps is closed with ``stack``.
    """

    def __init__(self, session: str, stack: contextlib.ExitStack) -> None:
        self.session = session
        self.ns_name = names.session_netns(session)
        self._stack = stack
        self._classes: dict[str, dict[int, ClassState]] = {}

    @functools.cached_property
    def links(self) -> dict[str, _Link]:
        return _session_links(self.ns_name)

    @functools.cached_property
    def qdiscs(self) -> dict[str, dict[int, tuple[str, int | None]]]:
        return read_qdiscs(self.ns_name)

    @functools.cached_property
    def table(self) -> nft.Table:
        return nft.read_table(self.ns_name)

    @functools.cached_property
    def engines(self) -> dict[str, list[str] | None]:
        return delayd.session_engines(self.session)

    @functools.cached_property
    def _netlink(self) -> Any:
        return self._stack.enter_context(nsops.opened(self.ns_name))

    def classes(self, device: str) -> dict[int, ClassState]:
        """The HTB classes of ``device`` (one of :attr:`links`), dumped once."""
        if device not in self._classes:
            self._classes[device] = read_classes_at(self._netlink, self.links[device].index)
        return self._classes[device]

    def qdiscs_of(self, device: str) -> dict[int, tuple[str, int | None]]:
        return self.qdiscs.get(device, {})


def _host_side_drift(view: _SessionView, vm: str, plan: Plan) -> list[str]:
    """The VM's links, classes, qdiscs, delay engine and guard in its session namespace."""
    present, problems = _link_drift(view.links, view.session, vm, plan)
    problems += compare_classes(plan, view.classes, present)
    problems += compare_qdiscs(plan, view.qdiscs_of, present)
    problems += _engine_drift(view.session, vm, plan, view.engines)
    problems += _guard_drift(view.table, plan)
    return problems


def _vm_side_drift(vm_ns: str, request: LaunchRequest, plan: Plan) -> list[str]:
    """``eth0``'s MAC, state and addresses, the routes' congestion control and the plan's
    sysctls, inside the VM: one netlink socket, and the sysctl files read in one visit."""
    problems = []
    with nsops.opened(vm_ns) as vns:
        link = _link_named(vns, names.VM_IFNAME)
        if link is None:
            problems.append(f"{names.VM_IFNAME} in {vm_ns}: expected present, found missing")
        else:
            mac = str(link.get_attr("IFLA_ADDRESS"))
            if mac != str(request.mac):
                problems.append(f"{names.VM_IFNAME} MAC: expected {request.mac}, found {mac}")
            if not link["flags"] & IFF_UP:
                problems.append(f"{names.VM_IFNAME} state: expected up, found down")
            have = {
                f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                for a in vns.get_addr(index=link["index"])
            }
            for want in (request.ipv4, request.ipv6):
                if str(want) not in have:
                    problems.append(
                        f"{names.VM_IFNAME} address: expected {want}, found "
                        + (", ".join(sorted(have)) or "none")
                    )
        if plan.congestion_control is not None:
            problems += _congctl_drift(vns, request, plan.congestion_control)
    if not plan.sysctls:
        return problems
    with nsops.inside(vm_ns):
        found = [(s, _read_sysctl_here(vm_ns, s.key)) for s in plan.sysctls]
    return problems + [
        f"sysctl {s.key}: expected {s.value}, found {value}"
        for s, value in found
        if value != s.value
    ]


def _link_named(ipr: Any, name: str) -> Any:
    """The link called ``name`` in the socket's namespace (one targeted get), or None."""
    try:
        (link,) = ipr.link("get", ifname=name)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise
    return link


def _read_sysctl_here(ns_name: str, key: str) -> str:
    """A sysctl of the namespace this thread is in (``ns_name``, for the message)."""
    try:
        with open("/proc/sys/" + key.replace(".", "/")) as f:
            return f.read().strip()
    except OSError as exc:
        return f"unreadable (cannot read {key} in {ns_name}: {exc.strerror})"


def _congctl_drift(vns: Any, request: LaunchRequest, algorithm: str) -> list[str]:
    """The congestion control of the route each session network is reached by.

    Launch sets it per route (see ``NetnsDriver._tcp``); what counts is the
    route the kernel picks, the one with the lowest metric when there are several.
    """
    best: dict[str, tuple[int, str]] = {}  # network -> (metric, algorithm)
    for route in vns.get_routes(table=RT_TABLE_MAIN):
        network = f"{route.get_attr('RTA_DST')}/{route['dst_len']}"
        metrics = route.get_attr("RTA_METRICS")
        algo = (metrics.get_attr("RTAX_CC_ALGO") if metrics is not None else None) or "none"
        metric = int(route.get_attr("RTA_PRIORITY") or 0)
        if network not in best or metric < best[network][0]:
            best[network] = (metric, str(algo))
    problems = []
    for net in (request.ipv4.network, request.ipv6.network):
        found = best.get(str(net), (0, "no route"))[1]
        if found != algorithm:
            problems.append(f"route {net} congctl: expected {algorithm}, found {found}")
    return problems


def _link_drift(
    links: Mapping[str, _Link], session: str, vm: str, plan: Plan
) -> tuple[set[str], list[str]]:
    """The VM's links in the session namespace (``links``, by name) against the plan: which
    exist, and each difference (missing, unexpected, untagged, down, on the wrong master)."""
    vm_links = names.VmLinks.of(vm)
    tag = names.owner_tag(session, vm)
    relay = plan.engine is not None
    want = (
        {vm_links.port, vm_links.relay, vm_links.relay_port}
        if relay
        else {vm_links.port, vm_links.ifb}
    )
    bridge = links.get(names.BRIDGE)
    problems = (
        [] if bridge is not None else [f"bridge {names.BRIDGE}: expected present, found missing"]
    )
    present = set()
    for name, role in (
        (vm_links.port, "port"),
        (vm_links.ifb, "IFB"),
        (vm_links.relay, "relay"),
        (vm_links.relay_port, "relay port"),
    ):
        link = links.get(name)
        if link is None:
            if name in want:
                problems.append(f"{role} {name}: expected present, found missing")
            continue
        present.add(name)
        if name not in want:
            problems.append(f"{role} {name}: expected none, found one")
            continue
        alias = link.alias or "none"
        if alias != tag:
            problems.append(f"{role} {name} tag: expected {tag}, found {alias}")
        if not link.up:
            problems.append(f"{role} {name} state: expected up, found down")
        on_bridge = name == plan.devices.bridge_port
        if on_bridge and (bridge is None or link.master != names.BRIDGE):
            problems.append(
                f"{role} {name} master: expected {names.BRIDGE}, found {link.master or 'none'}"
            )
        elif not on_bridge and link.master:
            problems.append(f"{role} {name} master: expected none, found {link.master}")
    return present & want, problems


def _engine_drift(
    session: str, vm: str, plan: Plan, engines: Mapping[str, list[str] | None]
) -> list[str]:
    """Whether the delay engine runs as the plan says, with the arguments it would get.

    ``engines``: the session's VMs with an engine pid file, with the arguments
    of the engine running for each (see :func:`delayd.session_engines`).
    """
    running = engines.get(vm)
    if plan.engine is None:
        return [] if running is None else ["delay engine: expected none, found one running"]
    if running is None:
        left = " (its pid file names no live engine)" if vm in engines else ""
        return [f"delay engine: expected running, found not running{left}"]
    expected = delayd.expected_arguments(session, vm, plan.engine)
    if running == expected:
        return []
    problems = []
    want, have = _engine_directions(expected), _engine_directions(running)
    for direction in sorted(want.keys() | have.keys()):
        a, b = want.get(direction, {}), have.get(direction, {})
        problems += [
            f"delay engine {direction} {key}: expected {a.get(key, 'none')}, found {b.get(key, 'none')}"
            for key in sorted(a.keys() | b.keys())
            if a.get(key) != b.get(key)
        ]
    flags_want = [x for x in expected if "=" not in x]
    flags_have = [x for x in running if "=" not in x]
    if flags_want != flags_have:
        problems.append(
            f"delay engine options: expected {' '.join(flags_want)}, found {' '.join(flags_have)}"
        )
    return problems


def _engine_directions(args: Sequence[str]) -> dict[str, dict[str, str]]:
    """The engine's per-direction arguments (``name=egress,delay=...``) by direction."""
    out = {}
    for arg in args:
        if "=" not in arg:
            continue
        fields = dict(kv.partition("=")[::2] for kv in arg.split(","))
        out[fields.pop("name", "?")] = fields
    return out


def _guard_drift(table: nft.Table, plan: Plan) -> list[str]:
    """The nft port guard: its chain, its rules (kind and value), and the tagged jump, in
    the session's table as :func:`nft.read_table` read it."""
    guard = plan.guard
    if guard is None:
        return []
    state = nft.guard_in(table, guard.chain, guard.identity.tag)
    problems = []
    if guard.port not in state.jumps:
        found = ", ".join(state.jumps) or "none"
        problems.append(
            f"nft jump to {guard.chain}: expected from {guard.port}, found from {found}"
        )
    if state.rules is None:
        return [*problems, f"nft chain {guard.chain}: expected present, found missing"]
    want = nft.expected_rules(guard)
    if state.rules != want:
        problems.append(
            f"nft chain {guard.chain} rules: expected {_rules_text(want)}, "
            f"found {_rules_text(state.rules) or 'none'}"
        )
    return problems


def _rules_text(rules: Sequence[tuple[str, str]]) -> str:
    return "; ".join(f"{comment} {value}" for comment, value in rules)
