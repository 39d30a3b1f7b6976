"""Reading a vNIC back and naming each difference from its plan: read-only.

The host side (:func:`host_side_drift`: one vNIC's links, classes, qdiscs, delay
engine and guard in its session namespace, read once per session through a
:class:`SessionView`) and a netns VM's own side (:func:`vm_side_drift`:
each vNIC's interface and addresses, route congestion control and sysctls
inside its namespace). Each difference is one short sentence naming the object, what the
plan expects and what was found.
"""

from __future__ import annotations

import contextlib
import errno
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from vnic.dataplane import delayd, nft
from vnic.dataplane import namespaces as nsops
from vnic.dataplane.inventory import Link, session_links
from vnic.dataplane.tc import (
    ClassState,
    compare_classes,
    compare_qdiscs,
    read_classes_at,
    read_qdiscs,
)
from vnic.model.launch import LaunchRequest
from vnic.plan import names
from vnic.plan.model import Plan

#: ``IFF_UP`` in a link's flags.
IFF_UP = 0x1
#: The main routing table, where the VM's routes are.
RT_TABLE_MAIN = 254


class SessionView:
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
    def links(self) -> dict[str, Link]:
        return session_links(self.ns_name)

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


def host_side_drift(view: SessionView, unit: str, plan: Plan) -> list[str]:
    """The links, classes, qdiscs, delay engine and guard of the vNIC ``unit`` in its
    session namespace."""
    present, problems = _link_drift(view.links, view.session, unit, plan)
    problems += compare_classes(plan, view.classes, present)
    problems += compare_qdiscs(plan, view.qdiscs_of, present)
    problems += _engine_drift(view.session, unit, plan, view.engines)
    problems += _guard_drift(view.table, plan)
    return problems


def vm_side_drift(vm_ns: str, request: LaunchRequest, plan: Plan) -> list[str]:
    """Each vNIC's interface (``eth0``, ``eth1``...: its MAC, state and addresses), the
    congestion control of every vNIC's routes and the sysctls of ``plan`` (``eth0``'s:
    the VM's TCP settings are per VM), inside the VM: one netlink socket, and the sysctl
    files read in one visit."""
    problems = []
    with nsops.opened(vm_ns) as vns:
        for nic in request.nics:
            problems += _nic_drift(vns, vm_ns, nic.name, str(nic.mac), (nic.ipv4, nic.ipv6))
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


def _nic_drift(
    vns: Any, vm_ns: str, ifname: str, mac: str, addresses: Sequence[object]
) -> list[str]:
    """One vNIC's interface in the VM: present, its MAC, up, its addresses."""
    link = _link_named(vns, ifname)
    if link is None:
        return [f"{ifname} in {vm_ns}: expected present, found missing"]
    problems = []
    found = str(link.get_attr("IFLA_ADDRESS"))
    if found != mac:
        problems.append(f"{ifname} MAC: expected {mac}, found {found}")
    if not link["flags"] & IFF_UP:
        problems.append(f"{ifname} state: expected up, found down")
    have = {
        f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in vns.get_addr(index=link["index"])
    }
    for want in addresses:
        if str(want) not in have:
            problems.append(
                f"{ifname} address: expected {want}, found " + (", ".join(sorted(have)) or "none")
            )
    return problems


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

    Launch sets it per route (see :func:`vnic.drivers.netns_vm.tcp_settings`); what counts is the
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
    nets = [net for n in request.nics for net in (n.ipv4.network, n.ipv6.network)]
    for net in dict.fromkeys(nets):
        found = best.get(str(net), (0, "no route"))[1]
        if found != algorithm:
            problems.append(f"route {net} congctl: expected {algorithm}, found {found}")
    return problems


def _link_drift(
    links: Mapping[str, Link], session: str, unit: str, plan: Plan
) -> tuple[set[str], list[str]]:
    """The vNIC's links in the session namespace (``links``, by name) against the plan: which
    exist, and each difference (missing, unexpected, untagged, down, on the wrong master)."""
    vm_links = names.VmLinks.of(unit)
    tag = names.owner_tag(session, unit)
    bridge_name = plan.devices.bridge
    relay = plan.engine is not None
    want = (
        {vm_links.port, vm_links.relay, vm_links.relay_port}
        if relay
        else {vm_links.port, vm_links.ifb}
    )
    bridge = links.get(bridge_name)
    problems = (
        [] if bridge is not None else [f"bridge {bridge_name}: expected present, found missing"]
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
        if on_bridge and (bridge is None or link.master != bridge_name):
            problems.append(
                f"{role} {name} master: expected {bridge_name}, found {link.master or 'none'}"
            )
        elif not on_bridge and link.master:
            problems.append(f"{role} {name} master: expected none, found {link.master}")
    return present & want, problems


def _engine_drift(
    session: str, unit: str, plan: Plan, engines: Mapping[str, list[str] | None]
) -> list[str]:
    """Whether the vNIC's delay engine runs as the plan says, with the arguments it would get.

    ``engines``: the session's vNICs (units) with an engine pid file, with the
    arguments of the engine running for each (see :func:`delayd.session_engines`).
    """
    running = engines.get(unit)
    if plan.engine is None:
        return [] if running is None else ["delay engine: expected none, found one running"]
    if running is None:
        left = " (its pid file names no live engine)" if unit in engines else ""
        return [f"delay engine: expected running, found not running{left}"]
    expected = delayd.expected_arguments(session, unit, plan.engine)
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
