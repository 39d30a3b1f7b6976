"""Read a namespace's traffic control back and compare it with a :class:`~vnic.plan.model.Plan`.

After launch, :func:`verify` reads every HTB class back from the kernel and
raises if one is missing or differs: a failed class add would otherwise leave
HTB's default path passing traffic unshaped. The ``compare_*`` functions take
readers instead of a socket, so a drift check can read a whole namespace once
for many plans. Rates are in bytes/s, as in :class:`~vnic.plan.model.HtbClass`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from typing import Any

from vnic.dataplane.namespaces import link_index, run_inside
from vnic.dataplane.tc.encode import handle, teach_pyroute2_bfifo
from vnic.errors import DataplaneError
from vnic.model.units import Rate
from vnic.plan.model import Plan

#: ``parent`` of a root qdisc and of the ingress qdisc in a netlink dump.
TC_ROOT = 0xFFFFFFFF
TC_INGRESS = 0xFFFFFFF1


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
    teach_pyroute2_bfifo()  # decodes bfifo's options
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
            want[(leaf.device, handle(leaf.class_minor))] = (leaf.kind, leaf.limit)
        for q in d.netem:
            parent = handle(q.parent_minor) if q.parent_minor else TC_ROOT
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
        parent = TC_ROOT if q.get("root") else _parsehandle(str(q.get("parent", "")))
        out.setdefault(str(q["dev"]), {})[parent] = (kind, limit)
    return out


def _parsehandle(text: str) -> int:
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
