"""A driver made of the shared host side and one VM side.

:class:`HostedDriver` composes :mod:`vnic.drivers.hostside` (the session's
namespace and bridge, each VM's host end with its shaping, guard and engine)
with a :class:`~vnic.drivers.vmside.VmSide` (what a VM is): the netns driver
with :class:`~vnic.drivers.netns_vm.NetnsVm`, the qemu driver with
:class:`~vnic.drivers.qemu_guest.QemuGuest`. VMs of both kinds share a
session's bridge; :data:`TENANTS` lists the kinds, so that a driver leaves the
other kind's VMs alone and the session's network stays while any is left.

Launch = session namespace and the bridges of the VM's networks (if new) ->
the VM and one port per vNIC (its start overlapping the rest) -> per vNIC the
host side of its compiled plan (one plan per one-vNIC slice of the request,
named by its unit), with the VM's own settings in the middle -> wait for the
VM. Any failure removes everything of the VM (all its vNICs) and re-raises; a
bridge it made stays, empty, until the session's teardown.

For a host agent that restarts (possibly after SIGKILL in the middle of a
launch): :meth:`HostedDriver.inventory` finds every VM with anything on the
host, by name or owner tag; :meth:`HostedDriver.drift_many` reads VMs' state
back, each session once, and names each difference from what launch builds;
and :meth:`HostedDriver.destroy` removes whatever a killed launch left.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from pyroute2.netlink.exceptions import NetlinkError

from vnic.dataplane import delayd
from vnic.dataplane.drift import SessionView, host_side_drift
from vnic.dataplane.inventory import is_namespace, netem_devices, session_objects
from vnic.dataplane.probe import Probe
from vnic.drivers import hostside, live, planning
from vnic.drivers.base import Driver, VmKey
from vnic.drivers.netns_vm import NetnsVm
from vnic.drivers.qemu_guest import QemuGuest
from vnic.drivers.vmside import VmSide
from vnic.errors import Conflict, DataplaneError, VnicError
from vnic.model.launch import (
    Capabilities,
    LaunchRequest,
    check_nic_count,
    check_supported,
    nic_lines,
    unit_vm,
)
from vnic.plan import names
from vnic.plan.model import Plan

#: The kinds of VM that share a session's bridge (see :meth:`VmSide.claims`).
TENANTS: tuple[VmSide, ...] = (NetnsVm(), QemuGuest())


class HostedDriver(Driver):
    """A driver whose VMs are ``vm_side``'s, each on the shared host side."""

    def __init__(self, vm_side: VmSide, probe: Probe | None = None) -> None:
        if vm_side.kind != self.kind:
            raise ValueError(f"a {vm_side.kind} VM side in the {self.kind} driver")
        self.vm_side = vm_side
        self.probe = probe

    def capabilities(self) -> Capabilities:
        return planning.capabilities(self.kind, self.probe)

    def plan_for(self, request: LaunchRequest) -> Plan:
        """The host-side plan of ``request``'s first vNIC on this host (see
        :func:`planning.plan_for`; a one-vNIC slice gives its vNIC's)."""
        return planning.plan_for(request, self.probe)

    def plans_for(self, request: LaunchRequest) -> list[Plan]:
        """The host-side plan of each vNIC of ``request``, in order."""
        return [self.plan_for(one) for one in request.per_nic()]

    # ------------------------------------------------------------------ launch and destroy

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
        (the wait for the VM) outside it, so launches in one session overlap.
        On failure nothing is left and the error is raised."""
        caps = self.capabilities()
        check_nic_count(caps, len(request.nics))
        for nic in request.nics:
            check_supported(caps, nic.values)
        session, vm = request.session, request.vm
        if self.vm_side.exists(session, vm):
            raise Conflict(
                f"VM {session}/{vm} is already running ({self.vm_side.thing(session, vm)})"
            )
        plans = self.plans_for(request)
        session_ns = hostside.ensure_session(session, [n.network for n in request.nics])
        try:
            self.vm_side.plug(request, plans)
            for i, (one, plan) in enumerate(zip(request.per_nic(), plans, strict=True)):
                # The VM's own settings (TCP, every vNIC's offloads) once, with the first.
                step = (lambda: self.vm_side.settings(request, plans)) if i == 0 else _nothing
                hostside.apply(session_ns, one, plan, step)
        except BaseException:
            self.destroy(session, vm)
            raise

    def launch_finish(self, request: LaunchRequest) -> None:
        """The end of a launch after :meth:`launch_begin`: wait until the VM is ready. On
        failure it raises and the caller destroys the VM (under the session's lock, as it
        began it)."""
        self.vm_side.wait_ready(request)

    def destroy(self, session: str, vm: str) -> None:
        """Remove everything of the VM, whatever state a killed launch (or destroy) left.

        Idempotent, and ordered so that each step still finds what it removes:
        the engines first (by their pid files, then by their owner tags for one
        whose pid was never recorded), then the VM itself (a netns VM's namespace
        takes ``eth0``, ``eth1``... and with them the ports), then the guards and
        the remaining links, and last what marks the VM as its kind's. Every vNIC
        the VM may have is covered, found by its unit's names and tags
        (:func:`vnic.plan.names.vm_units`): no request is needed.
        """
        hostside.stop_engines(session, vm)
        self.vm_side.remove(session, vm)
        hostside.remove_links(session, vm)
        self.vm_side.forget(session, vm)

    def teardown_session(self, session: str, vms: Sequence[str] = ()) -> None:
        """Destroy every VM of the session that has anything on this host (and ``vms``),
        then remove the session namespace unless VMs of another kind still use it."""
        found = self._vms(session).get(session, set())
        for vm in sorted({*vms, *found}):
            self.destroy(session, vm)
        if not any(t.claims(session).get(session) for t in TENANTS):
            hostside.remove_session(session)

    def running(self, session: str) -> list[str]:
        return self.vm_side.running(session)

    # ------------------------------------------------------------------ live change

    def reconfigure(self, previous: LaunchRequest, request: LaunchRequest) -> list[str]:
        """Change the running VM from ``previous`` to ``request`` in place; return one line per
        kernel change (empty when nothing differs).

        Checked before anything is touched: the fields are supported here, the VM
        runs, and its name, MAC and addresses are the same. Then only what differs
        changes (see :mod:`vnic.drivers.live`). On failure the previous state is
        restored as far as possible and :class:`DataplaneError` raised.
        """
        outcome = self.reconfigure_many([(previous, request)])[(request.session, request.vm)]
        if isinstance(outcome, VnicError):
            raise outcome
        return outcome

    def reconfigure_many(
        self, pairs: Sequence[tuple[LaunchRequest, LaunchRequest]]
    ) -> dict[VmKey, list[str] | VnicError]:
        """:meth:`reconfigure` of each pair, each session namespace entered once (see
        :func:`vnic.drivers.live.reconfigure_many`)."""
        return live.reconfigure_many(self.vm_side, self.capabilities(), self.plan_for, pairs)

    # ------------------------------------------------------------------ reading back

    def inventory(self) -> dict[str, set[str]]:
        """Every session with this kind's objects on this host, mapped to the VMs that have
        any. Read-only.

        A VM counts when anything of the VM itself exists (see :meth:`VmSide.vms`);
        for the kind that adopts leftovers (netns) also when any host-side object of
        it does and no other kind claims it: its delay engine's process or run
        files, a link in the session namespace tagged with it (found even when the
        VM is gone), a guard jump tagged with it. A session namespace without VMs
        then maps to an empty set. Costs one link dump and one nft listing per
        session namespace and one scan of /proc, whatever the number of VMs.
        """
        return self._vms()

    def _vms(self, only: str | None = None) -> dict[str, set[str]]:
        found = self.vm_side.vms(only)
        if not self.vm_side.adopts_leftovers:
            return found
        for session, vms in session_objects(only).items():
            found.setdefault(session, set()).update(vms)
        others: dict[str, set[str]] = {}
        for tenant in TENANTS:
            if tenant.kind != self.kind:
                for session, vms in tenant.claims(only).items():
                    others.setdefault(session, set()).update(vms)
        return {s: vms - others.get(s, set()) for s, vms in found.items()}

    def drift(self, request: LaunchRequest) -> list[str]:
        """How the kernel differs from what :meth:`launch` builds for ``request``, read back.

        One short sentence per difference, naming the object, what the plan
        expects and what was found; empty when nothing differs. A VM that is
        missing gives that one sentence. Read-only. For many VMs use
        :meth:`drift_many`, which reads each session namespace once.
        """
        return self.drift_many([request])[(request.session, request.vm)]

    def drift_many(self, requests: Sequence[LaunchRequest]) -> dict[VmKey, list[str]]:
        """:meth:`drift` of each request, by ``(session, vm)`` (the last request wins when a
        VM is named twice). Read-only.

        Each session namespace is read once for all its VMs: one link dump, one
        qdisc dump, one listing of the nftables table, one listing of the delay
        engines' run dir; then per VM, one class dump per shaped device (the
        kernel dumps classes one device at a time) and the VM side's own reads.
        """
        by_session: dict[str, list[LaunchRequest]] = {}
        for request in requests:
            by_session.setdefault(request.session, []).append(request)
        out: dict[VmKey, list[str]] = {}
        for session, batch in by_session.items():
            with contextlib.ExitStack() as stack:
                view = SessionView(session, stack)
                for request in batch:
                    out[(session, request.vm)] = self._drift(request, view)
        return out

    def _drift(self, request: LaunchRequest, view: SessionView) -> list[str]:
        session, vm = request.session, request.vm
        thing = self.vm_side.thing(session, vm)
        missing = [f"VM {session}/{vm}: {thing} expected, found missing"]
        if not self.vm_side.present(session, vm):
            return missing
        try:
            plans = self.plans_for(request)
            problems = self.vm_side.drift(request, plans)
            session_ns = names.session_netns(session)
            if not is_namespace(session_ns):
                return [
                    *problems,
                    f"session namespace {session_ns}: expected present, found missing",
                ]
            for one, plan in zip(request.per_nic(), plans, strict=True):
                problems += nic_lines(one.nic, host_side_drift(view, one.unit, plan))
            return problems
        except (OSError, NetlinkError, DataplaneError):
            if self.vm_side.present(session, vm):
                raise
            return missing  # destroyed while we looked

    # ------------------------------------------------------------------ counters and reports

    def engine_stats(self, session: str, vm: str) -> delayd.EngineStats | None:
        """Counters of a vNIC's delay engine, or None when it has none. ``vm`` is the vNIC's
        unit: the VM's name for its ``eth0``, ``VM.ethN`` for another
        (:func:`vnic.model.launch.link_unit`)."""
        return hostside.engine_stats(session, vm)

    def drop_counters(self, session: str, vm: str) -> dict[str, int]:
        """Frames from a vNIC dropped on the host side, by reason (spoof-mac, spoof-ipv4,
        ...). ``vm`` is the vNIC's unit, as for :meth:`engine_stats`."""
        return hostside.drop_counters(session, vm)

    def engines_in_use(self) -> list[dict[str, object]]:
        """Every vNIC on this host (of every kind of VM: netns VMs and QEMU guests), what
        carries its delay and loss and why, with counters: a row per VM for its ``eth0``
        (``nic``), and one for each other vNIC that has an engine or netem."""
        host = planning.choose_engine(self.probe)
        netem_by_session: dict[str, set[str]] = {}  # one qdisc dump per session, not per VM
        engines = delayd.run_files()  # by session, the units with engine files
        report: list[dict[str, object]] = []
        vms = [(s, vm, t.kind) for t in TENANTS for s, vm in t.every_vm()]
        for session, vm, kind in sorted(vms):
            netem = _netem_in(session, netem_by_session)
            for unit in names.vm_units(vm):
                links = names.VmLinks.of(unit)
                has = unit in engines.get(session, set()) or {links.port, links.ifb} & netem
                if unit != vm and not has:
                    continue
                row = self._engine_row(host, session, unit, netem)
                report.append(
                    {"session": session, "vm": vm, "nic": unit_vm(unit)[1], "driver": kind, **row}
                )
        return report

    @staticmethod
    def _engine_row(
        host: planning.EngineChoice, session: str, unit: str, netem: set[str]
    ) -> dict[str, object]:
        """What carries the delay and loss of the vNIC ``unit``, and why."""
        stats = delayd.read_stats(session, unit)
        links = names.VmLinks.of(unit)
        if stats is not None:
            why = (
                host.reason
                if host.engine == "delayd"
                else ("egress.duplicate: netem duplicating on the egress IFB crashes Linux 6.1")
            )
            return {
                "engine": "delayd",
                "why": why,
                "pid": stats.pid,
                "cpu_seconds": stats.cpu_seconds,
                "counters": stats.directions,
            }
        if {links.port, links.ifb} & netem:
            return {"engine": "netem", "why": host.reason}
        return {"engine": "none", "why": "its profile has no delay or loss"}


def _nothing() -> None:
    return  # the VM's own settings are applied with its first vNIC only


def _netem_in(session: str, seen: dict[str, set[str]]) -> set[str]:
    if session not in seen:
        seen[session] = netem_devices(names.session_netns(session))
    return seen[session]
