"""Apply the traffic-control operations of live changes (:mod:`vnic.plan.diff`) in place.

A live change changes objects in place: an HTB class by ``change-class``
(its queue, tokens and counters stay), a FIFO's limit by a qdisc request with
its own handle and kind (the kernel changes it, queue kept). These two carry
nearly every change (a new rate is two classes), so they are encoded by
:mod:`.encode` (the HTB class as at launch) and sent many at a time by a
:class:`~.batch.NetlinkBatch`. Everything else goes through pyroute2 (or
``tc`` for netem, as at launch).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from vnic.dataplane.namespaces import inside, opened, run_inside
from vnic.dataplane.tc.batch import NetlinkBatch, raw_socket
from vnic.dataplane.tc.encode import (
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    ROOT_HANDLE,
    RTM_NEWQDISC,
    RTM_NEWTCLASS,
    TEMP_MAJOR,
    TcRequest,
    fifo,
    handle,
    htb_class,
    pyroute2_keys,
    teach_pyroute2_bfifo,
)
from vnic.errors import DataplaneError
from vnic.plan import diff
from vnic.plan.model import NetemQdisc
from vnic.plan.netem import netem_argv

#: One queued request: netlink message type, flags, the request.
Queued = tuple[int, int, TcRequest]


def queued_requests(op: diff.Op, index: Callable[[str], int]) -> list[Queued] | None:
    """The requests that carry ``op`` in a batch, in order; None for an operation that is not
    queued (:meth:`LiveTc.apply` runs those at once). ``index``: device name -> interface
    index."""
    if isinstance(op, diff.ChangeClass):
        return [(RTM_NEWTCLASS, 0, htb_class(index(op.new.device), op.new))]
    if isinstance(op, diff.AddClass):
        return [(RTM_NEWTCLASS, NLM_F_CREATE | NLM_F_EXCL, htb_class(index(op.cls.device), op.cls))]
    if isinstance(op, diff.ChangeLeaf | diff.AddLeaf):
        leaf = op.new if isinstance(op, diff.ChangeLeaf) else op.leaf
        return [(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_REPLACE, fifo(index(leaf.device), leaf))]
    if isinstance(op, diff.ReplaceLeaf):
        # Same handle, other kind: the kernel refuses to change it, so graft the new
        # FIFO under a free handle, then under its own (the first one goes with it).
        at = index(op.new.device)
        flags = NLM_F_CREATE | NLM_F_REPLACE
        return [
            (RTM_NEWQDISC, flags, fifo(at, op.new, TEMP_MAJOR)),
            (RTM_NEWQDISC, flags, fifo(at, op.new)),
        ]
    return None


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
            teach_pyroute2_bfifo()
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
        what = diff.describe(op)
        queued = queued_requests(op, self.index)
        if queued is not None:
            for msg_type, flags, request in queued:
                self.batch.add(msg_type, flags, request, label, what)
        elif isinstance(op, diff.DeleteClass):
            self._now(label)
            self._pyroute2(
                what, "del-class", "htb", self.index(op.cls.device), handle(op.cls.minor)
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
                    target=handle(f.class_minor),
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
