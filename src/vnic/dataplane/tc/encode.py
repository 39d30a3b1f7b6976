"""Netlink encoding of the traffic-control objects vnic writes: one encoder per object.

An HTB class is encoded only by :func:`htb_class`, a FIFO leaf only by
:func:`fifo`. Launch (:mod:`.launch`, over the pyroute2 socket) and a live
change (:mod:`.live`, over a raw netlink socket) send the very bytes these
return, so a class changed live reads back as one launched with the same
values; ``tests/unit/test_tc_encode.py`` checks both transports carry them
unchanged. Rates are in bytes/s, bursts and quanta in bytes, as in
:class:`~vnic.plan.model.HtbClass`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from vnic.plan.compile import DEFAULT_MINOR
from vnic.plan.model import HtbClass, LeafQueue, U32Match

#: Handle of the HTB qdisc at a device's root (``1:``).
ROOT_HANDLE = 0x10000
#: Handle of the ingress qdisc (``ffff:``).
INGRESS_HANDLE = 0xFFFF0000
ETH_P_ALL = 0x0003
#: The u32 key that matches every packet.
MATCH_ALL_KEY = "0x0/0x0+0"
#: Handle major a replaced leaf passes through: a qdisc of another kind (or a fresh
#: one of the same kind) is grafted only under a handle not in use.
TEMP_MAJOR = 0xFFF0

# Netlink and tc constants (linux/netlink.h, linux/rtnetlink.h, linux/pkt_sched.h).
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

NLMSG = struct.Struct("=IHHII")
_TCMSG = struct.Struct("=BBHiIII")
_NLA = struct.Struct("=HH")
_RATESPEC = "BBHhHI"
_HTB_OPT = struct.Struct("=" + _RATESPEC + _RATESPEC + "5I")
_U32_MAX = 2**32 - 1


def handle(minor: int) -> int:
    """The handle of class ``1:minor``."""
    return ROOT_HANDLE | minor


def leaf_major(minor: int) -> int:
    """Handle major of the FIFO under class ``1:minor``: the minor, but ``2:`` under the
    default class (whose minor does not fit a major)."""
    return 2 if minor == DEFAULT_MINOR else minor


@dataclass(frozen=True)
class TcRequest:
    """One tc request (a ``struct tcmsg`` with its kind and options), without the netlink
    header: the transport adds it, with its type, flags and sequence.

    ``options`` is the already encoded payload of ``TCA_OPTIONS``.
    """

    index: int
    handle: int
    parent: int
    kind: str
    options: bytes

    def body(self) -> bytes:
        """The request as it follows the netlink header on the wire."""
        return (
            _TCMSG.pack(0, 0, 0, self.index, self.handle, self.parent, 0)
            + nla(TCA_KIND, self.kind.encode() + b"\0")
            + nla(TCA_OPTIONS, self.options)
        )


def nla(kind: int, payload: bytes) -> bytes:
    """A netlink attribute: length, type, payload, padded to 4 bytes."""
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


def htb_class(index: int, c: HtbClass) -> TcRequest:
    """The request setting HTB class ``c`` on the device with interface index ``index``.

    Burst and cburst (bytes) are converted to transmit time exactly as pyroute2
    and ``tc`` do (``calc_xmittime``, in the kernel's clock ticks); the link
    layer is given, so the kernel needs no rate table. Rates of 2^32-1 bytes/s
    and more go in the 64-bit attributes, the 32-bit fields saturated.
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
    options = nla(TCA_HTB_PARMS, parms)
    if c.rate >= _U32_MAX:
        options += nla(TCA_HTB_RATE64, struct.pack("=Q", c.rate))
    if c.ceil >= _U32_MAX:
        options += nla(TCA_HTB_CEIL64, struct.pack("=Q", c.ceil))
    parent = handle(c.parent_minor) if c.parent_minor else ROOT_HANDLE
    return TcRequest(index, handle(c.minor), parent, "htb", options)


def fifo(index: int, leaf: LeafQueue, major: int | None = None) -> TcRequest:
    """The request putting ``leaf`` (bfifo/pfifo) under its class, with handle ``major:``
    (the leaf's own, :func:`leaf_major`, by default)."""
    at = (major if major is not None else leaf_major(leaf.class_minor)) << 16
    options = struct.pack("=I", leaf.limit)  # struct tc_fifo_qopt, not nested
    return TcRequest(index, at, handle(leaf.class_minor), leaf.kind, options)


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


def teach_pyroute2_bfifo() -> None:
    """pyroute2 0.9.7 has no ``bfifo`` module and sends qdiscs of unknown kinds to
    the root, replacing HTB. bfifo's options are pfifo's (``struct tc_fifo_qopt``),
    so the pfifo module encodes (and decodes) it correctly."""
    from pyroute2.netlink.rtnl.tcmsg import plugins, sched_pfifo

    plugins.setdefault("bfifo", sched_pfifo)
