"""Apply a :class:`~vnic.plan.model.Plan`'s traffic control with netlink, and read it back.

Runs against an open pyroute2 socket of the namespace that holds the plan's
devices. After applying, :func:`verify` reads every HTB class back from the
kernel and raises if one is missing or differs: a failed class add would
otherwise leave HTB's default path passing traffic unshaped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

from vnic.dataplane.namespaces import link_index, run_inside
from vnic.errors import DataplaneError
from vnic.model.units import Rate
from vnic.plan.compile import DEFAULT_MINOR
from vnic.plan.model import DirectionPlan, HtbClass, Plan, U32Match
from vnic.plan.netem import netem_argv

ROOT_HANDLE = 0x10000
INGRESS_HANDLE = 0xFFFF0000
ETH_P_ALL = 0x0003
MATCH_ALL_KEY = "0x0/0x0+0"


def _handle(minor: int) -> int:
    return ROOT_HANDLE | minor


def _leaf_major(minor: int) -> int:
    return 2 if minor == DEFAULT_MINOR else minor


def _teach_pyroute2_bfifo() -> None:
    """pyroute2 0.9.7 has no ``bfifo`` module and sends qdiscs of unknown kinds to
    the root, replacing HTB. bfifo's options are pfifo's (``struct tc_fifo_qopt``),
    so the pfifo module encodes it correctly."""
    from pyroute2.netlink.rtnl.tcmsg import plugins, sched_pfifo

    plugins.setdefault("bfifo", sched_pfifo)


def apply_plan(ipr: Any, plan: Plan) -> None:
    """Create the plan's qdiscs, classes, filters and redirect on fresh devices."""
    _teach_pyroute2_bfifo()
    for direction in plan.directions():
        if direction.shaped:
            _apply_direction(ipr, direction)
    if plan.redirect is not None:
        port = link_index(ipr, plan.redirect.device)
        ifb = link_index(ipr, plan.redirect.target)
        ipr.tc("add", "ingress", port, INGRESS_HANDLE)
        ipr.tc(
            "add-filter",
            "u32",
            port,
            parent=INGRESS_HANDLE,
            prio=1,
            protocol=ETH_P_ALL,
            target=INGRESS_HANDLE | 1,
            keys=[MATCH_ALL_KEY],
            action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": ifb},
        )


def apply_netem(session_ns: str, plan: Plan) -> None:
    """Put the plan's netem qdiscs in place (after :func:`apply_plan` made their HTB classes)."""
    for d in plan.directions():
        for q in d.netem:
            proc = run_inside(session_ns, ["tc", *netem_argv(q)], capture_output=True, timeout=30)
            if proc.returncode != 0:
                raise DataplaneError(
                    f"cannot add netem on {q.device} ({d.direction}): {proc.stderr.strip()}"
                )


def _apply_direction(ipr: Any, d: DirectionPlan) -> None:
    assert d.device is not None
    if d.root is None:
        return  # netem alone, at the root: see apply_netem
    idx = link_index(ipr, d.device)
    ipr.tc("replace", "htb", idx, ROOT_HANDLE, default=d.root.default_minor)
    for c in d.classes:
        ipr.tc("replace-class", "htb", idx, _handle(c.minor), **_class_args(c))
    for leaf in d.leaves:
        ipr.tc(
            "replace",
            leaf.kind,
            idx,
            _leaf_major(leaf.class_minor) << 16,
            parent=_handle(leaf.class_minor),
            limit=leaf.limit,
        )
    for f in d.filters:
        ipr.tc(
            "add-filter",
            "u32",
            idx,
            parent=ROOT_HANDLE,
            prio=f.prio,
            protocol=f.protocol,
            target=_handle(f.class_minor),
            keys=pyroute2_keys(f.matches),
        )


def pyroute2_keys(matches: Sequence[U32Match]) -> list[str]:
    """u32 keys in the one form pyroute2 0.9.7 packs reliably: one key per byte.

    Its parser walks masks byte by byte and shifts offsets on leading zero
    bytes, so a 32-bit key with zero bytes inside its mask would land on the
    wrong bytes. Single-byte keys at exact offsets are packed back into 32-bit
    words by pyroute2 itself.
    """
    keys = []
    for m in matches:
        if m.mask == 0:
            keys.append(MATCH_ALL_KEY)
            continue
        for byte in range(4):
            shift = 24 - 8 * byte
            mask = (m.mask >> shift) & 0xFF
            if mask:
                keys.append(f"0x{(m.value >> shift) & mask:x}/0x{mask:x}+{m.offset + byte}")
    return keys


def _class_args(c: HtbClass) -> dict[str, Any]:
    return {
        "parent": _handle(c.parent_minor) if c.parent_minor else ROOT_HANDLE,
        "rate": c.rate,
        "ceil": c.ceil,
        "burst": c.burst,
        "cburst": c.cburst,
        "quantum": c.quantum,
        "prio": c.prio,
    }


@dataclass(frozen=True)
class ClassState:
    """An HTB class as the kernel reports it: rates in bytes/s."""

    minor: int
    rate: int
    ceil: int
    prio: int


def read_classes(ipr: Any, device: str) -> dict[int, ClassState]:
    """Every HTB class of ``device`` under ``1:``."""
    return read_classes_at(ipr, link_index(ipr, device))


def read_classes_at(ipr: Any, index: int) -> dict[int, ClassState]:
    """Every HTB class under ``1:`` of the device with interface index ``index``.

    The kernel dumps classes one device at a time (a class dump without a
    device returns nothing), so reading a namespace's classes is one dump per
    device; with the index known, no link lookup comes on top.
    """
    out: dict[int, ClassState] = {}
    for msg in ipr.get_classes(index=index):
        if msg.get_attr("TCA_KIND") != "htb" or (msg["handle"] >> 16) != 1:
            continue
        opts = msg.get_attr("TCA_OPTIONS")
        parms = opts.get_attr("TCA_HTB_PARMS")
        rate = opts.get_attr("TCA_HTB_RATE64") or parms["rate"]
        ceil = opts.get_attr("TCA_HTB_CEIL64") or parms["ceil"]
        minor = msg["handle"] & 0xFFFF
        out[minor] = ClassState(minor, int(rate), int(ceil), int(parms["prio"]))
    return out


def verify(ipr: Any, plan: Plan) -> None:
    """Read the plan's classes back; raise :class:`DataplaneError` on any difference."""
    problems = class_differences(ipr, plan)
    if problems:
        raise DataplaneError("kernel state differs from the plan: " + "; ".join(problems))


#: The HTB classes of one device by minor, as :func:`read_classes` returns them.
ClassReader = Callable[[str], Mapping[int, ClassState]]
#: The qdiscs of one device by parent handle (kind and FIFO limit), as :func:`read_qdiscs` has them.
QdiscReader = Callable[[str], Mapping[int, tuple[str, int | None]]]


def class_differences(ipr: Any, plan: Plan, devices: Set[str] | None = None) -> list[str]:
    """Each difference between the plan's HTB classes and the kernel's, as a short sentence.

    Compares rate, ceiling and priority, and names classes missing or not
    planned. ``devices``: the devices that exist, when the caller knows (a
    missing device is the caller's to report); by default every planned one
    must exist.
    """
    return compare_classes(plan, lambda device: read_classes(ipr, device), devices)


def compare_classes(
    plan: Plan, classes_of: ClassReader, devices: Set[str] | None = None
) -> list[str]:
    """:func:`class_differences` against classes read by ``classes_of`` (device -> classes),
    e.g. from a dump of the whole namespace taken once for many plans."""
    problems = []
    for d in plan.directions():
        if d.root is None or d.device is None:
            continue
        if devices is not None and d.device not in devices:
            continue
        state = dict(classes_of(d.device))
        for c in d.classes:
            name = f"{d.direction} class 1:{c.minor:x} on {d.device}"
            got = state.pop(c.minor, None)
            if got is None:
                problems.append(f"{name}: expected present, found missing")
                continue
            for what, want, have in (
                ("rate", c.rate, got.rate),
                ("ceil", c.ceil, got.ceil),
                ("prio", c.prio, got.prio),
            ):
                if want != have:
                    shown = (Rate(want * 8), Rate(have * 8)) if what != "prio" else (want, have)
                    problems.append(f"{name} {what}: expected {shown[0]}, found {shown[1]}")
        problems += [
            f"{d.direction} class 1:{minor:x} on {d.device}: expected none, found one "
            f"(rate {Rate(got.rate * 8)})"
            for minor, got in sorted(state.items())
        ]
    return problems


def qdisc_differences(ipr: Any, plan: Plan, devices: Set[str] | None = None) -> list[str]:
    """Each difference between the plan's qdiscs and the kernel's: the HTB root, each
    leaf's kind and limit, netem where the plan has it, and the ingress qdisc that
    redirects VM egress. ``devices`` as in :func:`class_differences`."""
    _teach_pyroute2_bfifo()  # decodes bfifo's options
    found: dict[str, dict[int, tuple[str, int | None]]] = {}

    def qdiscs_of(device: str) -> dict[int, tuple[str, int | None]]:
        if device not in found:
            found[device] = _qdiscs(ipr, device)
        return found[device]

    return compare_qdiscs(plan, qdiscs_of, devices)


def compare_qdiscs(
    plan: Plan, qdiscs_of: QdiscReader, devices: Set[str] | None = None
) -> list[str]:
    """:func:`qdisc_differences` against qdiscs read by ``qdiscs_of`` (device -> qdiscs by
    parent), e.g. from :func:`read_qdiscs`."""
    want: dict[tuple[str, int], tuple[str, int | None]] = {}  # (device, parent) -> kind, limit
    for d in plan.directions():
        if d.root is not None and d.device is not None:
            want[(d.device, TC_ROOT)] = ("htb", None)
        for leaf in d.leaves:
            want[(leaf.device, _handle(leaf.class_minor))] = (leaf.kind, leaf.limit)
        for q in d.netem:
            parent = _handle(q.parent_minor) if q.parent_minor else TC_ROOT
            want[(q.device, parent)] = ("netem", None)
    if plan.redirect is not None:
        want[(plan.redirect.device, TC_INGRESS)] = ("ingress", None)
    problems = []
    for (device, parent), (kind, limit) in sorted(want.items()):
        if devices is not None and device not in devices:
            continue
        have = qdiscs_of(device).get(parent)
        name = f"qdisc {_parent_name(parent)} on {device}"
        if have is None:
            problems.append(f"{name}: expected {kind}, found none")
        elif have[0] != kind:
            problems.append(f"{name}: expected {kind}, found {have[0]}")
        elif limit is not None and have[1] != limit:
            problems.append(f"{name} limit: expected {limit}, found {have[1]}")
    return problems


#: ``parent`` of a root qdisc and of the ingress qdisc in a netlink dump.
TC_ROOT = 0xFFFFFFFF
TC_INGRESS = 0xFFFFFFF1


def _qdiscs(ipr: Any, device: str) -> dict[int, tuple[str, int | None]]:
    """The qdiscs of ``device`` by parent handle: kind and (for FIFOs) limit."""
    out: dict[int, tuple[str, int | None]] = {}
    for msg in ipr.get_qdiscs(index=link_index(ipr, device)):
        kind = str(msg.get_attr("TCA_KIND"))
        limit = None
        if kind in ("bfifo", "pfifo"):
            opts = msg.get_attr("TCA_OPTIONS")
            limit = int(opts["limit"]) if opts is not None else None
        out[int(msg["parent"])] = (kind, limit)
    return out


def read_qdiscs(ns_name: str) -> dict[str, dict[int, tuple[str, int | None]]]:
    """The qdiscs of every device in namespace ``ns_name``, as :func:`_qdiscs` has them per
    device: device -> parent handle -> (kind, limit of a FIFO).

    One ``tc -j qdisc show`` (fixed and read-only): the kernel dumps the qdiscs
    of all devices at once, and tc decodes them far faster than pyroute2.
    """
    proc = run_inside(ns_name, ["tc", "-j", "qdisc", "show"], capture_output=True, timeout=30)
    if proc.returncode != 0:
        raise DataplaneError(f"cannot list the qdiscs of {ns_name}: {proc.stderr.strip()}")
    out: dict[str, dict[int, tuple[str, int | None]]] = {}
    for q in json.loads(proc.stdout or "[]"):
        kind = str(q.get("kind"))
        limit = None
        if kind in ("bfifo", "pfifo"):
            value = q.get("options", {}).get("limit")
            limit = int(value) if value is not None else None
        parent = TC_ROOT if q.get("root") else _parse_handle(str(q.get("parent", "")))
        out.setdefault(str(q["dev"]), {})[parent] = (kind, limit)
    return out


def _parse_handle(text: str) -> int:
    """A handle as tc prints it (``1:ffff``, ``ffff:``, ``:2``, ``ffff:fff1``); 0 for none."""
    major, sep, minor = text.partition(":")
    if not sep:
        return 0
    return (int(major or "0", 16) << 16) | int(minor or "0", 16)


def _parent_name(parent: int) -> str:
    if parent == TC_ROOT:
        return "root"
    if parent == TC_INGRESS:
        return "ingress"
    return f"under {parent >> 16:x}:{parent & 0xFFFF:x}"


@dataclass(frozen=True)
class ClassCounters:
    """Counters of one HTB class: bytes and packets sent, packets dropped, overlimits."""

    bytes: int
    packets: int
    drops: int
    overlimits: int


def read_class_counters(session_ns: str) -> dict[tuple[str, int], ClassCounters]:
    """Counters of every shaped class in a namespace: (device, class minor) -> counters.

    Read from the FIFO leaf under each HTB class, with one ``tc -s -j qdisc
    show`` (a fixed, read-only command): the kernel dumps the qdiscs of all
    devices at once, and tc's C decoder is about ten times faster here than
    decoding the same dump in Python. Drops are queue overflows of the class.
    """
    proc = run_inside(
        session_ns, ["tc", "-s", "-j", "qdisc", "show"], capture_output=True, timeout=30
    )
    if proc.returncode != 0:
        raise DataplaneError(f"cannot read qdisc counters in {session_ns}: {proc.stderr.strip()}")
    out: dict[tuple[str, int], ClassCounters] = {}
    for q in json.loads(proc.stdout or "[]"):
        parent = str(q.get("parent", ""))
        if q.get("kind") not in ("bfifo", "pfifo", "netem") or not parent.startswith("1:"):
            continue
        out[(str(q["dev"]), int(parent[2:], 16))] = ClassCounters(
            bytes=int(q.get("bytes", 0)),
            packets=int(q.get("packets", 0)),
            drops=int(q.get("drops", 0)),
            overlimits=int(q.get("overlimits", 0)),
        )
    return out
