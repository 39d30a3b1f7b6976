"""``diff_plans(old, new) -> [Op]``: what changes a running vNIC from one plan to another. Pure.

Each operation is a small frozen dataclass naming the kernel object it
changes, its old and its new state; :func:`describe` says it in one short
line ("egress: class 1:1 rate 10Mbit -> 20Mbit on vi..."). Nothing that
stays the same produces an operation.

Most changes are made in place, so queued packets, TCP connections and the
delay engine's random state survive: an HTB class is changed (rate, ceiling,
burst, quantum, priority), a FIFO's limit is changed on the same qdisc,
netem is changed with ``tc qdisc change``, the delay engine swaps its
parameters between two packets. Filters are replaced one priority at a time
(a u32 priority holds all filters of one QoS class and one protocol), and only
the priorities that differ.

A change of the shape of the host side is structural and gives one
:class:`RebuildHostSide` instead of the host-side operations: the delay
engine appears or disappears (the relay veth pair comes or goes), a direction
becomes shaped or stops being shaped, netem appears or disappears, the HTB
default class changes (HTB changes its classes in place, not its qdisc). The VM's
namespace and its own settings (sysctls, congestion control) are never
rebuilt.

Operations come in the order they are applied: filters that go away first
(so no filter points at a class being deleted), then classes deleted (with
their leaf), changed, added, then leaves, then filters added.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vnic.model.units import ByteSize, Duration, Rate
from vnic.plan.model import (
    ClassifierFilter,
    DelayEngine,
    DirectionPlan,
    HtbClass,
    Impairment,
    LeafQueue,
    NetemQdisc,
    Plan,
    PortGuard,
)

#: What a fresh network namespace has for each TCP sysctl a plan may set: a
#: sysctl the new plan no longer sets goes back to it.
SYSCTL_DEFAULTS = {
    "net.ipv4.tcp_window_scaling": "1",
    "net.ipv4.tcp_sack": "1",
    "net.ipv4.tcp_timestamps": "1",
    "net.ipv4.tcp_ecn": "2",
}


@dataclass(frozen=True)
class ChangeClass:
    """An HTB class changed in place (``tc class change``): its queue and statistics stay."""

    direction: str
    old: HtbClass
    new: HtbClass


@dataclass(frozen=True)
class AddClass:
    """A new HTB class (a QoS class appeared); its leaf comes in an :class:`AddLeaf`."""

    direction: str
    cls: HtbClass


@dataclass(frozen=True)
class DeleteClass:
    """An HTB class removed (a QoS class went away), with the leaf qdisc under it."""

    direction: str
    cls: HtbClass


@dataclass(frozen=True)
class ChangeLeaf:
    """A leaf FIFO's limit changed on the same qdisc (same kind, same handle)."""

    direction: str
    old: LeafQueue
    new: LeafQueue


@dataclass(frozen=True)
class ReplaceLeaf:
    """A leaf FIFO of another kind (bfifo <-> pfifo) grafted in place of the old one."""

    direction: str
    old: LeafQueue
    new: LeafQueue


@dataclass(frozen=True)
class AddLeaf:
    """The leaf FIFO of a class just added."""

    direction: str
    leaf: LeafQueue


@dataclass(frozen=True)
class DeleteFilters:
    """Every u32 filter at one priority and protocol of ``device`` removed."""

    direction: str
    device: str
    prio: int
    protocol: int
    filters: tuple[ClassifierFilter, ...]


@dataclass(frozen=True)
class AddFilters:
    """u32 filters added at one priority and protocol of ``device``, in order."""

    direction: str
    device: str
    prio: int
    protocol: int
    filters: tuple[ClassifierFilter, ...]


@dataclass(frozen=True)
class ChangeNetem:
    """A netem qdisc's parameters changed in place (``tc qdisc change``)."""

    direction: str
    old: NetemQdisc
    new: NetemQdisc

    @property
    def regraft(self) -> bool:
        """Whether a fresh netem must be grafted instead: ``tc qdisc change`` keeps the old
        jitter table when none is given, so going back to uniform jitter needs a new qdisc."""
        return (
            self.old.impairment.distribution != self.new.impairment.distribution
            and self.new.impairment.distribution == "uniform"
        )


@dataclass(frozen=True)
class AddNetem:
    """The netem leaf of a class just added (the direction already has netem)."""

    direction: str
    qdisc: NetemQdisc


@dataclass(frozen=True)
class ChangeEngine:
    """The delay engine's per-direction parameters, swapped in without a restart."""

    old: DelayEngine
    new: DelayEngine


@dataclass(frozen=True)
class SetOffloads:
    """Segmentation offload of a direction turned on or off (per-packet decisions need it off)."""

    direction: str
    on: bool


@dataclass(frozen=True)
class SetSysctl:
    """A sysctl inside the VM's namespace."""

    key: str
    old: str | None
    new: str


@dataclass(frozen=True)
class SetCongestionControl:
    """The VM's TCP congestion control (None: the host's default, no per-route choice)."""

    old: str | None
    new: str | None


@dataclass(frozen=True)
class ChangeGuard:
    """The port guard's rules rewritten (the DSCP mark changed); its jump stays."""

    old: PortGuard
    new: PortGuard


@dataclass(frozen=True)
class RebuildHostSide:
    """The host side rebuilt for the new plan (qdiscs, IFB or relay, guard, engine); the VM's
    namespace, ``eth0`` and processes stay. Traffic pauses briefly while it happens."""

    reasons: tuple[str, ...]


Op = (
    ChangeClass
    | AddClass
    | DeleteClass
    | ChangeLeaf
    | ReplaceLeaf
    | AddLeaf
    | DeleteFilters
    | AddFilters
    | ChangeNetem
    | AddNetem
    | ChangeEngine
    | SetOffloads
    | SetSysctl
    | SetCongestionControl
    | ChangeGuard
    | RebuildHostSide
)

#: Operations on the VM's own namespace (the rest are on the host side).
VM_SIDE = (SetSysctl, SetCongestionControl)
#: Traffic-control operations (applied in the session namespace by vnic.dataplane.tc).
TC_OPS = (
    ChangeClass,
    AddClass,
    DeleteClass,
    ChangeLeaf,
    ReplaceLeaf,
    AddLeaf,
    DeleteFilters,
    AddFilters,
    ChangeNetem,
    AddNetem,
)


def diff_plans(old: Plan, new: Plan) -> list[Op]:
    """The operations that turn the kernel state of ``old`` into that of ``new``, in order."""
    reasons = structural_changes(old, new)
    ops: list[Op] = []
    if reasons:
        ops.append(RebuildHostSide(tuple(reasons)))
    else:
        for o, n in zip(old.directions(), new.directions(), strict=True):
            ops += _direction_ops(o, n)
        if old.engine is not None and new.engine is not None and old.engine != new.engine:
            ops.append(ChangeEngine(old.engine, new.engine))
        if old.guard is not None and new.guard is not None and old.guard != new.guard:
            ops.append(ChangeGuard(old.guard, new.guard))
        ops += _offload_ops(old, new)
    ops += _sysctl_ops(old, new)
    if old.congestion_control != new.congestion_control:
        ops.append(SetCongestionControl(old.congestion_control, new.congestion_control))
    return ops


def structural_changes(old: Plan, new: Plan) -> list[str]:
    """Why the host side must be rebuilt to go from ``old`` to ``new`` (empty: it need not)."""
    out = []
    if (old.engine is None) != (new.engine is None):
        out.append(
            "the delay engine "
            + ("starts" if new.engine is not None else "stops")
            + " (its relay link is "
            + ("added" if new.engine is not None else "removed")
            + ")"
        )
    elif old.devices != new.devices:
        out.append("the vNIC's devices change")
    for o, n in zip(old.directions(), new.directions(), strict=True):
        if (o.root is None) != (n.root is None):
            out.append(f"{n.direction} becomes " + ("shaped" if n.root is not None else "unshaped"))
        elif bool(o.netem) != bool(n.netem):
            out.append(f"{n.direction} " + ("gains" if n.netem else "loses") + " netem")
        elif o.device != n.device and (old.engine is None) == (new.engine is None):
            out.append(f"{n.direction} moves from {o.device} to {n.device}")
        elif (
            o.root is not None
            and n.root is not None
            and o.root.default_minor != n.root.default_minor
        ):
            # HTB has no in-place change of its qdisc (only of its classes).
            out.append(f"{n.direction}: the HTB default class changes")
        elif _kept_parents(o, n) != _kept_parents(n, o):
            out.append(f"{n.direction}: a class moves to another parent")
    if (old.redirect is None) != (new.redirect is None) and not out:
        out.append("the egress redirect " + ("appears" if new.redirect else "goes"))
    old_port = old.guard.port if old.guard is not None else None
    new_port = new.guard.port if new.guard is not None else None
    if old_port != new_port and not out:
        out.append("the port guard moves")
    return out


def _kept_parents(a: DirectionPlan, b: DirectionPlan) -> set[tuple[int, int]]:
    """(minor, parent) in ``a`` of the classes both plans have: HTB cannot move a class to
    another parent in place."""
    kept = {c.minor for c in a.classes} & {c.minor for c in b.classes}
    return {(c.minor, c.parent_minor) for c in a.classes if c.minor in kept}


def _direction_ops(o: DirectionPlan, n: DirectionPlan) -> list[Op]:
    name = n.direction
    if n.root is None and not n.netem:
        return []
    old_classes = {c.minor: c for c in o.classes}
    new_classes = {c.minor: c for c in n.classes}
    old_leaves = {leaf.class_minor: leaf for leaf in o.leaves}
    old_groups = _filter_groups(o.filters)
    new_groups = _filter_groups(n.filters)
    ops: list[Op] = [
        DeleteFilters(name, f[0].device, prio, proto, f)
        for (prio, proto), f in sorted(old_groups.items())
        if new_groups.get((prio, proto)) != f
    ]
    # Children before parents when deleting, parents before children when adding.
    ops += [
        DeleteClass(name, c)
        for c in sorted(o.classes, key=lambda c: -_depth(c))
        if c.minor not in new_classes
    ]
    for c in n.classes:
        before = old_classes.get(c.minor)
        if before is None:
            ops.append(AddClass(name, c))
        elif before != c:
            ops.append(ChangeClass(name, before, c))
    for leaf in n.leaves:
        was = old_leaves.get(leaf.class_minor)
        if was is None or leaf.class_minor not in old_classes:
            ops.append(AddLeaf(name, leaf))
        elif was.kind != leaf.kind:
            ops.append(ReplaceLeaf(name, was, leaf))
        elif was != leaf:
            ops.append(ChangeLeaf(name, was, leaf))
    old_netem = {q.parent_minor: q for q in o.netem}
    for q in n.netem:
        was_q = old_netem.get(q.parent_minor)
        if was_q is None or (q.parent_minor and q.parent_minor not in old_classes):
            ops.append(AddNetem(name, q))
        elif was_q != q:
            ops.append(ChangeNetem(name, was_q, q))
    ops += [
        AddFilters(name, f[0].device, prio, proto, f)
        for (prio, proto), f in sorted(new_groups.items())
        if old_groups.get((prio, proto)) != f
    ]
    return ops


def _depth(c: HtbClass) -> int:
    return 0 if not c.parent_minor else 1


def _filter_groups(
    filters: tuple[ClassifierFilter, ...],
) -> dict[tuple[int, int], tuple[ClassifierFilter, ...]]:
    groups: dict[tuple[int, int], list[ClassifierFilter]] = {}
    for f in filters:
        groups.setdefault((f.prio, f.protocol), []).append(f)
    return {key: tuple(group) for key, group in groups.items()}


def _offload_ops(old: Plan, new: Plan) -> list[Op]:
    before = {i.direction for i in old.impairments if i.per_packet}
    after = {i.direction for i in new.impairments if i.per_packet}
    return [
        SetOffloads(d, on=d not in after)
        for d in ("egress", "ingress")
        if (d in before) != (d in after)
    ]


def _sysctl_ops(old: Plan, new: Plan) -> list[Op]:
    before = {s.key: s.value for s in old.sysctls}
    after = {s.key: s.value for s in new.sysctls}
    ops: list[Op] = [
        SetSysctl(key, before.get(key), value)
        for key, value in after.items()
        if before.get(key) != value
    ]
    ops += [
        SetSysctl(key, value, SYSCTL_DEFAULTS[key])
        for key, value in before.items()
        if key not in after and key in SYSCTL_DEFAULTS and value != SYSCTL_DEFAULTS[key]
    ]
    return ops


# ----------------------------------------------------------------------------- descriptions


def describe(op: Op) -> str:
    """One short line saying what ``op`` changes, naming the device."""
    match op:
        case ChangeClass(direction, old, new):
            return f"{direction}: class 1:{new.minor:x} {_changes(old, new)} on {new.device}"
        case AddClass(direction, cls):
            return (
                f"{direction}: class 1:{cls.minor:x} added (rate {_rate(cls.rate)}, "
                f"ceil {_rate(cls.ceil)}, prio {cls.prio}) on {cls.device}"
            )
        case DeleteClass(direction, cls):
            return f"{direction}: class 1:{cls.minor:x} removed on {cls.device}"
        case ChangeLeaf(direction, old, new):
            return (
                f"{direction}: {new.kind} under 1:{new.class_minor:x} limit "
                f"{_limit(old)} -> {_limit(new)} on {new.device}"
            )
        case ReplaceLeaf(direction, old, new):
            return (
                f"{direction}: queue under 1:{new.class_minor:x} {old.kind} {_limit(old)} -> "
                f"{new.kind} {_limit(new)} on {new.device} (its queued packets are dropped)"
            )
        case AddLeaf(direction, leaf):
            return (
                f"{direction}: {leaf.kind} limit {_limit(leaf)} added under "
                f"1:{leaf.class_minor:x} on {leaf.device}"
            )
        case DeleteFilters(direction, device, prio, _proto, filters):
            return f"{direction}: {len(filters)} filter(s) at prio {prio} removed on {device}"
        case AddFilters(direction, device, prio, _proto, filters):
            return f"{direction}: {len(filters)} filter(s) at prio {prio} added on {device}"
        case ChangeNetem(direction, old, new):
            where = f"under 1:{new.parent_minor:x}" if new.parent_minor else "at the root"
            return f"{direction}: netem {where} {_netem_changes(old, new)} on {new.device}"
        case AddNetem(direction, q):
            return f"{direction}: netem added under 1:{q.parent_minor:x} on {q.device}"
        case ChangeEngine(old, new):
            return f"delay engine: {_engine_changes(old, new)} (in place)"
        case SetOffloads(direction, on):
            return f"{direction}: segmentation offload {'on' if on else 'off'}"
        case SetSysctl(key, before, after):
            return f"sysctl {key} {before if before is not None else 'default'} -> {after}"
        case SetCongestionControl(before, after):
            return f"tcp congestion control {before or 'default'} -> {after or 'default'}"
        case ChangeGuard(old, new):
            return f"port guard {new.chain}: {_guard_changes(old, new)}"
        case RebuildHostSide(reasons):
            return (
                "host side rebuilt: "
                + "; ".join(reasons)
                + " (the VM and its connections stay; traffic pauses briefly)"
            )
    raise TypeError(f"not a plan operation: {op!r}")


def _rate(bytes_per_second: int) -> str:
    return str(Rate(bytes_per_second * 8))


def _size(n: int) -> str:
    return str(ByteSize(n))


def _limit(leaf: LeafQueue) -> str:
    return _size(leaf.limit) if leaf.kind == "bfifo" else f"{leaf.limit}pkt"


def _changes(old: HtbClass, new: HtbClass) -> str:
    parts = []
    for name in ("rate", "ceil", "burst", "cburst", "quantum", "prio"):
        a, b = getattr(old, name), getattr(new, name)
        if a == b:
            continue
        if name in ("rate", "ceil"):
            parts.append(f"{name} {_rate(a)} -> {_rate(b)}")
        elif name == "prio":
            parts.append(f"prio {a} -> {b}")
        else:
            parts.append(f"{name} {_size(a)} -> {_size(b)}")
    return ", ".join(parts)


def _impairment_changes(old: Impairment | None, new: Impairment | None) -> list[str]:
    if old == new:
        return []
    if old is None or new is None:
        return ["on" if new is not None else "off (relayed untouched)"]
    parts = []
    for f in fields(Impairment):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b or f.name == "direction":
            continue
        if f.name in ("delay", "jitter"):
            parts.append(f"{f.name} {Duration(a)} -> {Duration(b)}")
        elif f.name == "limit":
            parts.append(f"limit {_size(a)} -> {_size(b)}")
        else:
            parts.append(f"{f.name} {a} -> {b}")
    return parts


def _netem_changes(old: NetemQdisc, new: NetemQdisc) -> str:
    parts = _impairment_changes(old.impairment, new.impairment)
    if old.limit != new.limit:
        parts.append(f"limit {old.limit} -> {new.limit} packets")
    if old.rate != new.rate:
        parts.append(f"rate {_rate(old.rate)} -> {_rate(new.rate)}")
    return ", ".join(parts)


def _engine_changes(old: DelayEngine, new: DelayEngine) -> str:
    parts = []
    for name in ("egress", "ingress"):
        changed = _impairment_changes(getattr(old, name), getattr(new, name))
        if changed:
            parts.append(f"{name} " + ", ".join(changed))
    return "; ".join(parts)


def _guard_changes(old: PortGuard, new: PortGuard) -> str:
    if old.dscp_mark != new.dscp_mark:
        before = "none" if old.dscp_mark is None else str(old.dscp_mark)
        after = "none" if new.dscp_mark is None else str(new.dscp_mark)
        return f"dscp mark {before} -> {after}"
    return "rules rewritten"
