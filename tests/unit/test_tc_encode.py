"""An HTB class is one netlink message, whichever path sends it: launch (pyroute2's
socket, :func:`vnic.dataplane.tc.launch.apply_plan`) and a live change (a raw
socket, :class:`vnic.dataplane.tc.batch.NetlinkBatch`) put the same bytes on the
wire for every class of the table. No kernel: both sockets are fakes that keep
what would be sent."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from pyroute2.netlink.rtnl.tcmsg import tcmsg
from pyroute2.netlink.rtnl.tcmsg.common import calc_xmittime

from vnic.dataplane.tc import encode
from vnic.dataplane.tc.batch import NetlinkBatch
from vnic.dataplane.tc.launch import REPLACE_FLAGS, apply_plan
from vnic.dataplane.tc.live import queued_requests
from vnic.plan import diff
from vnic.plan.model import Devices, DirectionPlan, HtbClass, HtbRoot, Plan

DEVICE, INDEX = "vp-web", 7
G = 10**9 // 8  # one Gbit/s in bytes/s

#: (minor, parent minor, rate, ceil, burst, cburst, quantum, prio): rates in bytes/s.
CLASSES = [
    (1, 0, 125_000, 125_000, 3028, 3028, 1514, 0),  # 1 Mbit/s root
    (0x10, 1, 625_000, 1_250_000, 6000, 9000, 1514, 3),  # borrows up to its ceiling
    (0xFFFF, 1, 1, 1, 1, 1, 1, 7),  # the smallest of everything, the default class
    (2, 1, 12_500, 125_000_000, 1514, 64_000, 9014, 1),  # jumbo quantum
    (3, 0, 40 * G, 40 * G, 1 << 20, 1 << 20, 65_535, 0),  # 40 Gbit/s: 64-bit rate and ceil
    (4, 1, G, 40 * G, 100_000, 1 << 20, 1514, 2),  # only the ceiling needs 64 bits
    (5, 1, 2**32 - 1, 2**32 - 1, 1514, 1514, 1514, 5),  # just at the 32-bit limit
    (6, 1, 2**32 - 2, 2**32, 1514, 1514, 1514, 6),  # either side of it
]


def htb(row: tuple[int, ...]) -> HtbClass:
    minor, parent, rate, ceil, burst, cburst, quantum, prio = row
    return HtbClass(DEVICE, minor, parent, rate, ceil, burst, cburst, quantum, prio)


class FakeIpr:
    """A pyroute2 socket that keeps what :func:`apply_plan` sends."""

    def __init__(self) -> None:
        self.classes: list[tuple[int, int, bytes]] = []  # type, flags, body after the header
        self.tc_calls: list[tuple[Any, ...]] = []

    def link(self, command: str, ifname: str) -> list[dict[str, int]]:
        assert (command, ifname) == ("get", DEVICE)
        return [{"index": INDEX}]

    def tc(self, *args: Any, **kwargs: Any) -> None:
        self.tc_calls.append(args)

    def nlm_request_batch(self, msgs: list[Any]) -> list[Any]:
        for msg in msgs:
            msg.encode()
            header = msg["header"]
            self.classes.append((header["type"], header["flags"], bytes(msg.data[16:])))
        return []


class FakeRawSocket:
    """A raw netlink socket that keeps what :class:`NetlinkBatch` sends and acknowledges
    every request."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int, bytes]] = []
        self._acks = b""

    def settimeout(self, timeout: float) -> None:
        pass

    def sendto(self, data: bytes, addr: tuple[int, int]) -> None:
        offset = 0
        while offset < len(data):
            length, msg_type, flags, seq, _ = encode.NLMSG.unpack_from(data, offset)
            self.sent.append((msg_type, flags, data[offset + 16 : offset + length]))
            ack = struct.pack("=i", 0) + data[offset : offset + 16]
            self._acks += encode.NLMSG.pack(16 + len(ack), encode.NLMSG_ERROR, 0, seq, 0) + ack
            offset += length + (-length % 4)

    def recv(self, size: int) -> bytes:
        data, self._acks = self._acks, b""
        return data


def launched(classes: list[HtbClass]) -> list[tuple[int, int, bytes]]:
    """What launch sends for ``classes`` (all on one device)."""
    plan = Plan(
        Devices(port=DEVICE, ifb="ifb-web"),
        egress=DirectionPlan("egress"),
        ingress=DirectionPlan("ingress", DEVICE, HtbRoot(DEVICE, 0xFFFF), classes=tuple(classes)),
    )
    ipr = FakeIpr()
    apply_plan(ipr, plan)
    assert ipr.tc_calls == [("replace", "htb", INDEX, encode.ROOT_HANDLE)]
    return ipr.classes


def changed_live(ops: list[diff.Op]) -> list[tuple[int, int, bytes]]:
    """What a live change sends for ``ops``, through the batch it uses."""
    sock = FakeRawSocket()
    batch = NetlinkBatch(sock)
    for op in ops:
        queued = queued_requests(op, {DEVICE: INDEX}.__getitem__)
        assert queued is not None
        for msg_type, flags, request in queued:
            batch.add(msg_type, flags, request, "label", "what")
    assert batch.send() == {}
    return sock.sent


@pytest.mark.parametrize("row", CLASSES, ids=lambda r: f"1:{r[0]:x}")
def test_launch_and_live_change_send_the_same_class(row: tuple[int, ...]) -> None:
    c = htb(row)
    [(launch_type, launch_flags, at_launch)] = launched([c])
    old = HtbClass(DEVICE, c.minor, c.parent_minor, 1, 1, 1, 1, 1, 0)
    [(change_type, change_flags, changed), (add_type, add_flags, added)] = changed_live(
        [diff.ChangeClass("ingress", old, c), diff.AddClass("ingress", c)]
    )
    assert at_launch == changed == added  # the same attribute bytes
    assert launch_type == change_type == add_type == encode.RTM_NEWTCLASS
    ack = encode.NLM_F_REQUEST | encode.NLM_F_ACK
    assert launch_flags == REPLACE_FLAGS
    assert change_flags == ack  # change in place: fails if the class is gone
    assert add_flags == ack | encode.NLM_F_CREATE | encode.NLM_F_EXCL


@pytest.mark.parametrize("row", CLASSES, ids=lambda r: f"1:{r[0]:x}")
def test_the_message_says_what_the_class_is(row: tuple[int, ...]) -> None:
    """Decoded by pyroute2 (as a dump is): the class's handle, parent and parameters, bursts
    as transmit times the way ``tc`` computes them, rates past 32 bits in the 64-bit
    attributes."""
    c = htb(row)
    [(msg_type, flags, body)] = launched([c])
    msg = tcmsg(encode.NLMSG.pack(16 + len(body), msg_type, flags, 1, 0) + body)
    msg.decode()
    assert (msg["index"], msg["handle"]) == (INDEX, 0x10000 | c.minor)
    assert msg["parent"] == 0x10000 | c.parent_minor
    assert msg.get_attr("TCA_KIND") == "htb"
    opts = msg.get_attr("TCA_OPTIONS")
    parms = opts.get_attr("TCA_HTB_PARMS")
    assert (parms["quantum"], parms["prio"]) == (c.quantum, c.prio)
    assert parms["buffer"] == calc_xmittime(c.rate, c.burst)
    assert parms["cbuffer"] == calc_xmittime(c.ceil, c.cburst)
    assert parms["rate"] == min(c.rate, 2**32 - 1)
    assert parms["ceil"] == min(c.ceil, 2**32 - 1)
    assert (opts.get_attr("TCA_HTB_RATE64") or parms["rate"]) == c.rate
    assert (opts.get_attr("TCA_HTB_CEIL64") or parms["ceil"]) == c.ceil


def test_a_whole_direction_is_sent_in_order() -> None:
    classes = [htb(r) for r in CLASSES]
    at_launch = [body for _, _, body in launched(classes)]
    live = [body for _, _, body in changed_live([diff.AddClass("ingress", c) for c in classes])]
    assert at_launch == live
    assert len(set(at_launch)) == len(classes)
