"""Apply a :class:`~vnic.plan.model.Plan`'s traffic control with netlink, and read it back.

Runs against an open pyroute2 socket of the namespace that holds the plan's
devices. After applying, :func:`verify` reads every HTB class back from the
kernel and raises if one is missing or differs: a failed class add would
otherwise leave HTB's default path passing traffic unshaped.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from vnic.dataplane.namespaces import inside, link_index, opened, run_inside
from vnic.errors import DataplaneError
from vnic.model.units import Rate
from vnic.plan.compile import DEFAULT_MINOR
from vnic.plan.model import DirectionPlan, HtbClass, LeafQueue, NetemQdisc, Plan, U32Match
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


# ----------------------------------------------------------------------------- live change
#
# A live change (see vnic.plan.diff) changes objects in place: an HTB class by
# ``change-class`` (its queue, tokens and counters stay), a FIFO's limit by a
# qdisc request with its own handle and kind (the kernel changes it, queue
# kept). These two carry nearly every change (a new rate is two classes), so
# they are encoded here and sent many at a time on one raw netlink socket,
# each answered by its own acknowledgement: pyroute2 computes HTB rate tables
# the kernel no longer needs, about 0.4 ms per request. Everything else goes
# through pyroute2 (or ``tc`` for netem, as at launch).

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLMSG_ERROR = 0x2
RTM_NEWQDISC = 36
RTM_NEWTCLASS = 40
TCA_KIND = 1
TCA_OPTIONS = 2
TCA_HTB_PARMS = 1
TCA_HTB_RATE64 = 6
TCA_HTB_CEIL64 = 7
TC_LINKLAYER_ETHERNET = 1
#: Handle major a replaced leaf passes through: a qdisc of another kind (or a fresh
#: one of the same kind) is grafted only under a handle not in use.
TEMP_MAJOR = 0xFFF0
_NLMSG = struct.Struct("=IHHII")
_TCMSG = struct.Struct("=BBHiIII")
_NLA = struct.Struct("=HH")
_RATESPEC = "BBHhHI"
_HTB_OPT = struct.Struct("=" + _RATESPEC + _RATESPEC + "5I")
_U32_MAX = 2**32 - 1
#: Bytes of requests sent in one datagram.
_SEND_CHUNK = 16 * 1024


def _nla(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


def _tc_request(index: int, handle: int, parent: int, kind: str, options: bytes) -> bytes:
    """One tc request without its netlink header (added, with the sequence, on sending)."""
    return (
        _TCMSG.pack(0, 0, 0, index, handle, parent, 0)
        + _nla(TCA_KIND, kind.encode() + b"\0")
        + _nla(TCA_OPTIONS, options)
    )


def htb_class_request(index: int, c: HtbClass) -> bytes:
    """The body of a request setting HTB class ``c`` on device ``index``.

    Burst and cburst are converted to time exactly as pyroute2 does at launch
    (so a class changed here reads back as one launched with the same values);
    the link layer is given, so the kernel needs no rate table.
    """
    from pyroute2.netlink.rtnl.tcmsg.common import calc_xmittime

    rate, ceil = min(c.rate, _U32_MAX), min(c.ceil, _U32_MAX)
    parms = _HTB_OPT.pack(
        *(0, TC_LINKLAYER_ETHERNET, 0, 0, 0, rate),
        *(0, TC_LINKLAYER_ETHERNET, 0, 0, 0, ceil),
        calc_xmittime(c.rate, c.burst),
        calc_xmittime(c.ceil, c.cburst),
        c.quantum,
        0,
        c.prio,
    )
    options = _nla(TCA_HTB_PARMS, parms)
    if c.rate >= _U32_MAX:
        options += _nla(TCA_HTB_RATE64, struct.pack("=Q", c.rate))
    if c.ceil >= _U32_MAX:
        options += _nla(TCA_HTB_CEIL64, struct.pack("=Q", c.ceil))
    parent = _handle(c.parent_minor) if c.parent_minor else ROOT_HANDLE
    return _tc_request(index, _handle(c.minor), parent, "htb", options)


def fifo_request(index: int, leaf: LeafQueue, major: int | None = None) -> bytes:
    """The body of a request putting ``leaf`` (bfifo/pfifo) under its class, handle ``major:``
    (the leaf's own by default)."""
    handle = (major if major is not None else _leaf_major(leaf.class_minor)) << 16
    options = struct.pack("=I", leaf.limit)  # struct tc_fifo_qopt, not nested
    return _tc_request(index, handle, _handle(leaf.class_minor), leaf.kind, options)


class NetlinkBatch:
    """tc requests sent together on one raw rtnetlink socket, each acknowledged.

    :meth:`add` queues a request with a label (whose change it is); :meth:`send`
    sends everything queued and returns the failures, label -> messages. The
    kernel handles each request of a datagram on its own, so one failure does
    not stop the others.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._queue: list[tuple[int, int, bytes, object, str]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, msg_type: int, flags: int, body: bytes, label: object, what: str) -> None:
        self._queue.append((msg_type, flags | NLM_F_REQUEST | NLM_F_ACK, body, label, what))

    def send(self, timeout: float = 5.0) -> dict[object, list[str]]:
        """Send the queue in chunks, reading each chunk's acknowledgements before the next:
        a socket's receive buffer holds a few hundred acknowledgements, not thousands."""
        if not self._queue:
            return {}
        failures: dict[object, list[str]] = {}
        waiting: dict[int, tuple[object, str]] = {}
        chunk = bytearray()
        self._sock.settimeout(timeout)
        for msg_type, flags, body, label, what in self._queue:
            self._seq += 1
            waiting[self._seq] = (label, what)
            chunk += _NLMSG.pack(_NLMSG.size + len(body), msg_type, flags, self._seq, 0) + body
            if len(chunk) >= _SEND_CHUNK:
                self._sock.sendto(bytes(chunk), (0, 0))
                chunk.clear()
                self._acknowledged(waiting, failures)
        if chunk:
            self._sock.sendto(bytes(chunk), (0, 0))
            self._acknowledged(waiting, failures)
        self._queue.clear()
        return failures

    def _acknowledged(
        self, waiting: dict[int, tuple[object, str]], failures: dict[object, list[str]]
    ) -> None:
        """Read acknowledgements until none is awaited; errors go to ``failures``."""
        try:
            while waiting:
                data = self._sock.recv(1 << 20)
                offset = 0
                while offset + _NLMSG.size <= len(data):
                    length, msg_type, _flags, seq, _pid = _NLMSG.unpack_from(data, offset)
                    if msg_type == NLMSG_ERROR and seq in waiting:
                        (code,) = struct.unpack_from("=i", data, offset + _NLMSG.size)
                        label, what = waiting.pop(seq)
                        if code:
                            failures.setdefault(label, []).append(
                                f"{what}: {os.strerror(-code)} (errno {-code})"
                            )
                    offset += max(length + (-length % 4), _NLMSG.size)
        except TimeoutError:
            for label, what in waiting.values():
                failures.setdefault(label, []).append(f"{what}: no answer from the kernel")
            waiting.clear()


def raw_socket() -> socket.socket:
    """A raw rtnetlink socket in this thread's namespace (open it inside the session's)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    # Acknowledgements without a copy of each request; and room for a chunk's worth of
    # them: the receive buffer counts each one's whole socket buffer (about 1 KB), so
    # the default 208 KB overflows at a couple of hundred (ENOBUFS).
    sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RCVBUF)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
    sock.bind((0, 0))
    return sock


#: ``setsockopt`` level and option of netlink sockets (linux/netlink.h).
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
#: ``SO_RCVBUFFORCE`` (asm-generic/socket.h): a receive buffer above rmem_max, as root.
SO_RCVBUFFORCE = 33
_RCVBUF = 8 << 20


class LiveTc:
    """Applies the traffic-control operations of live changes in one session namespace.

    Class and FIFO changes are queued in a :class:`NetlinkBatch` (sent by
    :meth:`flush`, or before any other operation, so order holds) and their
    failures collected in :attr:`failures` by label; other operations run at
    once and raise :class:`DataplaneError`. Device indexes
    are looked up with ``if_nametoindex`` inside the namespace (an ioctl, no
    dump); the pyroute2 socket opens on first need. Use as a context manager.
    """

    def __init__(self, ns_name: str) -> None:
        self.ns_name = ns_name
        self._stack = contextlib.ExitStack()
        with inside(ns_name):
            self._sock = raw_socket()
        self._stack.callback(self._sock.close)
        self.batch = NetlinkBatch(self._sock)
        self._indexes: dict[str, int] = {}
        self._ipr: Any = None
        #: Failures of queued requests, by label, once sent.
        self.failures: dict[object, list[str]] = {}

    def __enter__(self) -> LiveTc:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def ipr(self) -> Any:
        if self._ipr is None:
            self._ipr = self._stack.enter_context(opened(self.ns_name))
            _teach_pyroute2_bfifo()
        return self._ipr

    def index(self, device: str) -> int:
        if device not in self._indexes:
            with inside(self.ns_name):
                try:
                    self._indexes[device] = socket.if_nametoindex(device)
                except OSError:
                    raise DataplaneError(
                        f"device {device!r} does not exist in {self.ns_name}"
                    ) from None
        return self._indexes[device]

    def flush(self) -> dict[object, list[str]]:
        """Send what is queued; every failure so far, by label (see :attr:`failures`)."""
        for label, messages in self.batch.send().items():
            self.failures.setdefault(label, []).extend(messages)
        return self.failures

    def _now(self, label: object) -> None:
        """Before an operation that is not queued: send the queue, so order holds."""
        self.flush()

    def apply(self, op: Any, label: object) -> None:
        """Apply (or queue) one traffic-control operation of :mod:`vnic.plan.diff`."""
        from vnic.plan import diff

        what = diff.describe(op)
        if isinstance(op, diff.ChangeClass):
            body = htb_class_request(self.index(op.new.device), op.new)
            self.batch.add(RTM_NEWTCLASS, 0, body, label, what)
        elif isinstance(op, diff.AddClass):
            body = htb_class_request(self.index(op.cls.device), op.cls)
            self.batch.add(RTM_NEWTCLASS, NLM_F_CREATE | NLM_F_EXCL, body, label, what)
        elif isinstance(op, diff.ChangeLeaf | diff.AddLeaf):
            leaf = op.new if isinstance(op, diff.ChangeLeaf) else op.leaf
            body = fifo_request(self.index(leaf.device), leaf)
            self.batch.add(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_REPLACE, body, label, what)
        elif isinstance(op, diff.ReplaceLeaf):
            # Same handle, other kind: the kernel refuses to change it, so graft the new
            # FIFO under a free handle, then under its own (the first one goes with it).
            index = self.index(op.new.device)
            flags = NLM_F_CREATE | NLM_F_REPLACE
            self.batch.add(
                RTM_NEWQDISC, flags, fifo_request(index, op.new, TEMP_MAJOR), label, what
            )
            self.batch.add(RTM_NEWQDISC, flags, fifo_request(index, op.new), label, what)
        elif isinstance(op, diff.DeleteClass):
            self._now(label)
            self._pyroute2(
                what, "del-class", "htb", self.index(op.cls.device), _handle(op.cls.minor)
            )
        elif isinstance(op, diff.DeleteFilters):
            self._now(label)
            self._pyroute2(
                what,
                "del-filter",
                "u32",
                self.index(op.device),
                parent=ROOT_HANDLE,
                prio=op.prio,
                protocol=op.protocol,
            )
        elif isinstance(op, diff.AddFilters):
            self._now(label)
            for f in op.filters:
                self._pyroute2(
                    what,
                    "add-filter",
                    "u32",
                    self.index(f.device),
                    parent=ROOT_HANDLE,
                    prio=f.prio,
                    protocol=f.protocol,
                    target=_handle(f.class_minor),
                    keys=pyroute2_keys(f.matches),
                )
        elif isinstance(op, diff.ChangeNetem | diff.AddNetem):
            self._now(label)
            self._netem(op)
        else:
            raise TypeError(f"not a traffic-control operation: {op!r}")

    def _pyroute2(self, what: str, *args: Any, **kwargs: Any) -> None:
        try:
            self.ipr.tc(*args, **kwargs)
        except NetlinkError as exc:
            raise DataplaneError(f"{what}: {exc}") from exc

    def _netem(self, op: Any) -> None:
        from vnic.plan import diff

        if isinstance(op, diff.AddNetem):
            runs = [netem_argv(op.qdisc)]
        elif op.regraft:
            # Back to uniform jitter: "change" keeps the old distribution table, so graft a
            # fresh netem under a free handle, then under its own.
            argv = netem_argv(op.new)
            at = argv.index("handle") + 1
            runs = [[*argv[:at], f"{TEMP_MAJOR:x}:", *argv[at + 1 :]], argv]
        else:
            runs = [netem_change_argv(op.new)]
        for args in runs:
            proc = run_inside(self.ns_name, ["tc", *args], capture_output=True, timeout=30)
            if proc.returncode != 0:
                raise DataplaneError(f"{diff.describe(op)}: {proc.stderr.strip()}")


def netem_change_argv(q: NetemQdisc) -> list[str]:
    """``tc qdisc change ...`` arguments for ``q``: its parameters changed in place (packets held
    by netem stay)."""
    argv = netem_argv(q)
    return ["qdisc", "change", *argv[2:]]
