"""The host side of every vNIC: the session's namespace and bridge, and the host end of
each VM's link with its shaping, guard and delay engine.

Everything here is per vNIC, keyed by its *unit* (the VM's name for ``eth0``,
``VM.NIC`` for the others, :func:`vnic.model.launch.link_unit`): a function
taking ``unit`` gets a one-vNIC request's :attr:`~LaunchRequest.unit`; the
removers taking a VM find its vNICs' units themselves (:func:`vnic.plan.names.vm_units`).

The netns and qemu drivers share it: a vNIC's port on its network's bridge (a veth end or
a tap, made by the VM side, see :mod:`vnic.drivers.vmside`) gets the same IFB
or engine relay, the same compiled plan (HTB for the VM's ingress on the port,
IFB + HTB for its egress), netem or the delay engine, and the anti-spoofing
guard. Everything here runs in the session namespace; nothing enters a VM.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable, Collection

from pyroute2.netlink.exceptions import NetlinkError

from vnic.dataplane import delayd, nft, overlay
from vnic.dataplane import namespaces as nsops
from vnic.dataplane.inventory import is_namespace
from vnic.dataplane.tc import apply_netem, apply_plan, verify
from vnic.drivers.planning import egress_per_packet
from vnic.errors import DataplaneError
from vnic.model.launch import LaunchRequest
from vnic.plan import names
from vnic.plan.compile import guard_chain
from vnic.plan.model import DelayEngine, Plan


def ensure_session(session: str, networks: Collection[str] = ()) -> str:
    """The session's namespace and its bridges (``vbr0``, and one per network of
    ``networks``), made if new; returns the namespace's name.

    A bridge made for a launch that then fails stays, empty, until the session's
    teardown removes the namespace: another launch may be using it already.
    """
    session_ns = names.session_netns(session)
    nsops.ensure_session(session_ns, session, [names.bridge_of(n) for n in networks])
    return session_ns


def apply(session_ns: str, request: LaunchRequest, plan: Plan, vm_step: Callable[[], None]) -> None:
    """Apply ``plan`` to the links (made already) of the vNIC of the one-vNIC ``request``:
    the guard (started in the background, reaped even on failure), ``vm_step`` (the VM's
    own settings), host-side offloads, traffic control read back, netem, and the delay
    engine. Launch and a structural live change both build the host side this way."""
    guard = nft.start_guard(session_ns, plan.guard) if plan.guard else None
    try:
        vm_step()
        _offloads(session_ns, plan)
        with nsops.opened(session_ns) as ns:
            apply_plan(ns, plan)
            verify(ns, plan)
        apply_netem(session_ns, plan)
        if plan.engine is not None:
            delayd.start(session_ns, request.session, request.unit, plan.engine)
    finally:
        if guard is not None:
            guard.wait()


def _offloads(session_ns: str, plan: Plan) -> None:
    """Host-side segmentation offload off where per-packet decisions are made (see
    Impairment.per_packet): VM ingress through the engine is segmented by the bridge's
    transmit to the relay. (VM egress is segmented by the VM's own interface, which the
    VM side switches; netem sits on the port itself, where frames from other VMs still
    arrive as super-packets.)"""
    if plan.engine is None:
        return
    if any(i.per_packet and i.direction == "ingress" for i in plan.impairments):
        nsops.set_offloads(session_ns, plan.devices.relay_port, on=False)


def rebuild(
    session_ns: str,
    request: LaunchRequest,
    old: Plan,
    new: Plan,
    set_vm_offloads: Callable[[bool], None],
) -> None:
    """Host side of ``new`` in place of ``old``'s for the vNIC of the one-vNIC ``request``,
    keeping the port (and so the VM's NIC). ``set_vm_offloads(on)`` switches the VM's
    own egress offloads of that vNIC, called when the two plans differ in needing them off."""
    session, unit = request.session, request.unit
    delayd.stop(session, unit)
    remove_guards(session_ns, session, unit)
    nsops.replug_host_side(
        session_ns, session, unit, relay=new.engine is not None, bridge=new.devices.bridge
    )

    def vm_offloads() -> None:
        if egress_per_packet(old) != egress_per_packet(new):
            set_vm_offloads(not egress_per_packet(new))

    apply(session_ns, request, new, vm_offloads)


def change_engine(session_ns: str, session: str, unit: str, parameters: DelayEngine) -> None:
    """Give the vNIC's running delay engine new parameters, without a restart when it can."""
    if delayd.controllable(session, unit):
        delayd.update(session, unit, parameters)
    else:  # started before live changes existed: a restart is the only way
        delayd.stop(session, unit)
        delayd.start(session_ns, session, unit, parameters)


def set_relay_offloads(session_ns: str, plan: Plan, *, on: bool) -> None:
    """Segmentation offload of the engine's relay port (VM ingress), if the plan has one."""
    if plan.engine is not None:
        nsops.set_offloads(session_ns, plan.devices.relay_port, on=on)


# ----------------------------------------------------------------------------- removing


def stop_engines(session: str, vm: str, grace: float = 2.0) -> None:
    """Stop the delay engines of every vNIC of the VM: by their pid files, then any a pid
    file does not name (TERM, then KILL after ``grace`` s).

    A launch killed between starting an engine and recording its pid leaves
    one; it carries its vNIC's owner tag, which is how it is found (one scan of
    /proc for all the VM's vNICs).
    """
    units = names.vm_units(vm)
    for unit in units:
        delayd.stop(session, unit)
    owners = {(session, unit) for unit in units}
    victims = [pid for pid, owner in delayd.engine_processes().items() if owner in owners]
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


def remove_guards(session_ns: str, session: str, unit: str) -> None:
    """The vNIC's guard chains and their tagged jumps (on the port and the relay port)."""
    links = names.VmLinks.of(unit)
    for port in (links.port, links.relay_port):
        nft.remove_guard(session_ns, guard_chain(port), names.owner_tag(session, unit))


def guarded_units(session_ns: str, session: str, vm: str) -> list[str]:
    """The VM's vNICs with a guard: ``eth0``'s unit always (as before VMs had several
    vNICs), the others' when a jump carries their tag (one nft listing; the guard's
    chain and jump are made in one nft transaction, so a chain never lacks its jump)."""
    tags = set(nft.jump_tags(session_ns))
    units = names.vm_units(vm)
    return [u for u in units if u == vm or names.owner_tag(session, u) in tags]


def remove_links(session: str, vm: str) -> None:
    """The guards and links of every vNIC of the VM in its session namespace, whatever a
    killed launch left.

    A session namespace that is only a placeholder file (a launch killed
    between creating and mounting it) holds none of these, so it is skipped;
    :func:`remove_session` removes it.
    """
    session_ns = names.session_netns(session)
    if not is_namespace(session_ns):
        return
    for unit in guarded_units(session_ns, session, vm):
        remove_guards(session_ns, session, unit)
    _unplug(session_ns, session, names.vm_units(vm))


def _unplug(session_ns: str, session: str, units: Collection[str]) -> None:
    """Delete the links of the vNICs ``units`` in the session namespace: those tagged with
    their unit, and those with their names and no tag at all (one socket, a targeted
    get per name: no dump).

    A link gets its tag in a second netlink call after it is made, so a launch
    killed in between leaves it untagged; in vnic's own session namespace a
    link with the VM's (hash-derived) name and no alias can only be that. A
    link with the name but another VM's tag (a hash collision) is left alone.
    Deleting one end of a veth deletes the other, so an end may vanish between
    lookup and delete.
    """
    with nsops.opened(session_ns) as ns:
        for unit in units:
            tag = names.owner_tag(session, unit)
            for name in names.VmLinks.of(unit).all():
                try:
                    (link,) = ns.link("get", ifname=name)
                    if link.get_attr("IFLA_IFALIAS") in (tag, None, ""):
                        ns.link("del", index=link["index"])
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:
                        raise DataplaneError(
                            f"cannot delete {name} in {session_ns}: {exc}"
                        ) from exc


def remove_session(session: str) -> None:
    """Remove the session's namespace, and with it the bridges and overlay devices; then
    the session's overlay filter in the host's namespace (idempotent)."""
    nsops.remove(names.session_netns(session))
    overlay.remove(session)


# ----------------------------------------------------------------------------- counters


def engine_stats(session: str, unit: str) -> delayd.EngineStats | None:
    """Counters of the delay engine of the vNIC ``unit`` (the VM's name: its ``eth0``;
    ``VM.ethN``: that vNIC), or None when it has none."""
    return delayd.read_stats(session, unit)


def drop_counters(session: str, unit: str) -> dict[str, int]:
    """Frames from the vNIC ``unit`` (as :func:`engine_stats`) dropped on the host side, by
    reason (spoof-mac, spoof-ipv4, ...)."""
    links = names.VmLinks.of(unit)
    port = links.relay_port if delayd.running(session, unit) else links.port
    return nft.drop_counters(names.session_netns(session), guard_chain(port))
