"""Live change of running vNICs of a host-side driver, in place.

Both plans compiled, their difference (:mod:`vnic.plan.diff`) applied in place
in the session namespace: HTB classes and FIFO limits in place, filters by
priority, netem by ``tc qdisc change``, the delay engine without a restart,
the guard's rules, and the settings inside the VM through its VM side
(:class:`~vnic.drivers.vmside.VmSide`: TCP, egress offloads). A structural
change (the delay engine comes or goes, a direction becomes shaped or
unshaped) rebuilds the host side only: the VM, its NIC, its processes and
their connections stay, with a brief pause in traffic. On failure the VM's
previous state is restored as far as possible.

A VM with several vNICs changes per vNIC: each vNIC's old one-vNIC slice is
diffed against its new one, so a change to one vNIC touches only that vNIC's
objects, and the lines returned for a vNIC other than ``eth0`` start with its
name (``eth1: ...``). The vNICs themselves (names, networks, MACs, addresses)
change only on a stopped VM: a request changing them is refused before
anything is touched. The VM's TCP settings are ``eth0``'s plan's (see
:func:`vnic.drivers.planning.plan_for`) and go to every vNIC's routes.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from vnic.dataplane import nft
from vnic.dataplane.tc import LiveTc
from vnic.drivers import hostside
from vnic.drivers.vmside import VmSide
from vnic.errors import Conflict, DataplaneError, InvalidInput, VnicError
from vnic.model.launch import Capabilities, LaunchRequest, check_supported, nic_lines
from vnic.plan import diff, names
from vnic.plan.model import Plan

VmKey = tuple[str, str]
#: What a failed step may raise: the restore and the outcome take each of these.
_ERRORS = (VnicError, OSError, NetlinkError, subprocess.SubprocessError)


@dataclass(frozen=True)
class LiveChange:
    """One vNIC's live change: its one-vNIC requests, their plans and the operations
    between them, with the whole VM's request (``vm_request``: the VM's TCP settings
    go to every vNIC's routes)."""

    previous: LaunchRequest
    request: LaunchRequest
    old: Plan
    new: Plan
    ops: list[diff.Op]
    vm_previous: LaunchRequest
    vm_request: LaunchRequest

    @property
    def key(self) -> VmKey:
        return (self.request.session, self.request.vm)

    @property
    def structural(self) -> bool:
        return any(isinstance(op, diff.RebuildHostSide) for op in self.ops)

    def lines(self) -> list[str]:
        """The kernel lines of the change, named by the vNIC when it is not ``eth0``."""
        return nic_lines(self.request.nic, (diff.describe(op) for op in self.ops))

    def reversed(self) -> LiveChange:
        """The change back from ``request`` to ``previous``."""
        return LiveChange(
            self.request,
            self.previous,
            self.new,
            self.old,
            diff.diff_plans(self.new, self.old),
            self.vm_request,
            self.vm_previous,
        )


def reconfigure_many(
    vm_side: VmSide,
    caps: Capabilities,
    plan_for: Callable[[LaunchRequest], Plan],
    pairs: Sequence[tuple[LaunchRequest, LaunchRequest]],
) -> dict[VmKey, list[str] | VnicError]:
    """The live change of each ``(previous, request)`` pair, by ``(session, vm)``.

    A VM's failure is its outcome (the error, its previous state restored), not
    the others'. Each session namespace is entered once: one raw netlink socket
    carries the class and FIFO changes of all its VMs in one batch, each request
    acknowledged on its own.
    """
    by_session: dict[str, list[tuple[LaunchRequest, LaunchRequest]]] = {}
    out: dict[VmKey, list[str] | VnicError] = {}
    for previous, request in pairs:
        by_session.setdefault(request.session, []).append((previous, request))
    for session, batch in by_session.items():
        changes = []
        for previous, request in batch:
            try:
                changes += _live_changes(vm_side, caps, plan_for, previous, request)
            except VnicError as exc:
                out[(request.session, request.vm)] = exc
        out.update(_apply_live(vm_side, session, changes))
    return out


def _live_changes(
    vm_side: VmSide,
    caps: Capabilities,
    plan_for: Callable[[LaunchRequest], Plan],
    previous: LaunchRequest,
    request: LaunchRequest,
) -> list[LiveChange]:
    """Each vNIC's plans and their difference, after every check that needs no change."""
    for nic in request.nics:
        check_supported(caps, nic.values)
    who = f"{request.session}/{request.vm}"
    if (previous.session, previous.vm) != (request.session, request.vm):
        raise InvalidInput.one("vm", f"{previous.session}/{previous.vm}", f"the same VM as {who}")
    _check_same_nics(previous, request)
    if not vm_side.present(request.session, request.vm):
        raise Conflict(f"VM {who} is not running")
    changes = []
    for before, after in zip(previous.per_nic(), request.per_nic(), strict=True):
        old, new = plan_for(before), plan_for(after)
        changes.append(
            LiveChange(before, after, old, new, diff.diff_plans(old, new), previous, request)
        )
    return changes


def _check_same_nics(previous: LaunchRequest, request: LaunchRequest) -> None:
    """Refuse (:class:`Conflict`) a request whose vNICs differ from the running VM's in
    number, names, networks, MACs or addresses: those change only on a stopped VM."""
    who = f"{request.session}/{request.vm}"
    stopped = "vNICs change only on a stopped VM (a live change keeps them)"
    had, has = [n.name for n in previous.nics], [n.name for n in request.nics]
    if had != has:
        raise Conflict(
            f"nics: {', '.join(has)} asked for VM {who}, which runs with {', '.join(had)}: {stopped}"
        )
    for before, after in zip(previous.nics, request.nics, strict=True):
        for name, old, new in (
            ("network", before.network, after.network),
            ("network_id", before.network_id, after.network_id),
            ("mac", before.mac, after.mac),
            ("ipv4", before.ipv4, after.ipv4),
            ("ipv6", before.ipv6, after.ipv6),
        ):
            if old != new:
                raise Conflict(
                    f"{after.name}.{name}: {new} asked for VM {who}, which runs with {old}: "
                    + stopped
                )


def _apply_live(
    vm_side: VmSide, session: str, changes: Sequence[LiveChange]
) -> dict[VmKey, list[str] | VnicError]:
    """Apply the changes of one session's VMs: traffic control of all of them first (one
    batch), then per VM the engine, guard, offloads and TCP settings."""
    out: dict[VmKey, list[str] | VnicError] = {}
    session_ns = names.session_netns(session)
    failed: dict[VmKey, str] = {}
    todo = [c for c in changes if c.ops]
    lines: dict[VmKey, list[str]] = {c.key: [] for c in changes}
    if not todo:
        return dict(lines)
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
                    _rebuild(vm_side, session_ns, c.request, c.old, c.new)
                for op in c.ops:
                    if not isinstance(op, (*diff.TC_OPS, diff.RebuildHostSide)):
                        _apply_other(vm_side, session_ns, c, op)
            except _ERRORS as exc:
                failed[c.key] = str(exc)
        for c in todo:
            if c.key in failed:  # any vNIC's failure: every vNIC of the VM goes back
                _restore(vm_side, session_ns, live, c)
                who = f"{c.request.session}/{c.request.vm}"
                out[c.key] = DataplaneError(
                    f"live change of {who} failed, its previous state restored: " + failed[c.key]
                )
            else:
                lines[c.key] += c.lines()
    return {**lines, **out}


def _rebuild(
    vm_side: VmSide, session_ns: str, request: LaunchRequest, old: Plan, new: Plan
) -> None:
    """The host side of ``new`` in place of ``old``'s (the VM and its port stay)."""
    hostside.rebuild(session_ns, request, old, new, lambda on: vm_side.set_offloads(request, on=on))


def _apply_other(vm_side: VmSide, session_ns: str, c: LiveChange, op: diff.Op) -> None:
    """One operation that is not traffic control (engine, guard, offloads, TCP)."""
    if isinstance(op, diff.ChangeEngine):
        hostside.change_engine(session_ns, c.request.session, c.request.unit, op.new)
    elif isinstance(op, diff.ChangeGuard):
        nft.rewrite_guard(session_ns, op.new)
    elif isinstance(op, diff.SetOffloads):
        if op.direction == "egress":
            vm_side.set_offloads(c.request, on=op.on)
        else:
            hostside.set_relay_offloads(session_ns, c.new, on=op.on)
    elif isinstance(op, diff.SetSysctl):  # per VM: only eth0's plan has any
        vm_side.set_sysctl(c.vm_request, op.key, op.new)
    elif isinstance(op, diff.SetCongestionControl):  # per VM, on every vNIC's routes
        vm_side.set_congestion_control(c.vm_request, op.new)


def _restore(vm_side: VmSide, session_ns: str, live: LiveTc, c: LiveChange) -> None:
    """Put the VM back to its previous plan as far as possible (best effort, no raise)."""
    if c.structural:
        with contextlib.suppress(*_ERRORS):
            _rebuild(vm_side, session_ns, c.previous, c.new, c.old)
        return
    back = c.reversed()
    label = ("restore", c.key)
    for op in back.ops:
        with contextlib.suppress(*_ERRORS):
            if isinstance(op, diff.TC_OPS):
                live.apply(op, label)
                live.flush()
            elif not isinstance(op, diff.RebuildHostSide):
                _apply_other(vm_side, session_ns, back, op)
    live.failures.pop(label, None)
