"""The active latency probe: ICMP echo from each session's switch to each of its VMs.

One raw ICMP socket per session, opened inside the session namespace by this
thread (no process per VM): every VM gets one echo request per round, and the
replies are matched by identifier and sequence number. The session switch
answers from the session's reserved ``.1`` address, put on the bridge the
first time it is probed (it goes away with the session namespace). The
round trip crosses the VM's shaping both ways, so it includes the profile's
egress and ingress delay.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from vnic.dataplane import names
from vnic.dataplane import namespaces as nsops

ECHO_REQUEST, ECHO_REPLY = 8, 0


@dataclass(frozen=True)
class Target:
    session: str
    vm: str
    network_id: int
    ipv4: str


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return int(~total & 0xFFFF)


def echo_request(ident: int, seq: int) -> bytes:
    header = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq)
    payload = b"vnic-latency"
    return struct.pack("!BBHHH", ECHO_REQUEST, 0, _checksum(header + payload), ident, seq) + payload


def switch_address(network_id: int) -> ipaddress.IPv4Interface:
    net = names.session_ipv4(network_id)
    return ipaddress.IPv4Interface((int(net.network_address) + 1, net.prefixlen))


def _ensure_switch_address(session_ns: str, network_id: int) -> None:
    address = switch_address(network_id)
    with nsops.opened(session_ns) as ipr:
        index = nsops.link_index(ipr, names.BRIDGE)
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=socket.AF_INET)}
        if str(address.ip) not in have:
            ipr.addr(
                "add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen
            )


def measure(
    targets: Sequence[Target], timeout: float = 1.0, rounds: int = 2
) -> dict[tuple[str, str], float | None]:
    """Round trip to every target, seconds; None where no reply came within ``timeout``.

    Each round sends every target one echo request; the result is the last round
    that got a reply. The first round also resolves neighbours (an ARP exchange
    through the VM's shaping, which would double a delayed VM's round trip), so
    with the default two rounds the second one measures the path alone.
    """
    out: dict[tuple[str, str], float | None] = {(t.session, t.vm): None for t in targets}
    by_session: dict[str, list[Target]] = {}
    for t in targets:
        by_session.setdefault(t.session, []).append(t)
    ident = os.getpid() & 0xFFFF
    for session, group in sorted(by_session.items()):
        session_ns = names.session_netns(session)
        if not nsops.exists(session_ns):
            continue
        _ensure_switch_address(session_ns, group[0].network_id)
        with nsops.inside(session_ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        with sock:
            sock.setblocking(False)
            for round_ in range(rounds):
                for key, rtt in _round(sock, group, ident, round_ * len(group), timeout).items():
                    if rtt is not None:
                        out[key] = rtt
    return out


def _round(
    sock: socket.socket, group: Sequence[Target], ident: int, first_seq: int, timeout: float
) -> dict[tuple[str, str], float | None]:
    out: dict[tuple[str, str], float | None] = {}
    sent: dict[int, tuple[Target, float]] = {}
    for i, t in enumerate(group):
        seq = (first_seq + i) & 0xFFFF
        try:
            sock.sendto(echo_request(ident, seq), (t.ipv4, 0))
        except OSError:
            continue  # no route or neighbour: stays None
        sent[seq] = (t, time.monotonic())
    deadline = time.monotonic() + timeout
    while sent and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            break
        packet, (source, _) = sock.recvfrom(2048)
        arrived = time.monotonic()
        ihl = (packet[0] & 0x0F) * 4
        kind, _, _, rid, rseq = struct.unpack_from("!BBHHH", packet, ihl)
        if kind != ECHO_REPLY or rid != ident or rseq not in sent:
            continue
        target, at = sent[rseq]
        if source != target.ipv4:
            continue
        del sent[rseq]
        out[(target.session, target.vm)] = arrived - at
    return out
